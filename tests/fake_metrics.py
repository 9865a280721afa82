"""The one stand-in for `convserve.server.metrics.Metrics` that tests pass to servers.

It records the request accounting calls the servicers and the HTTP API make
(`api.RequestMetrics`, the real methods' signatures) and exposes a registry with a
`convserve_requests` counter, so a server started with it still serves
/metrics. The stand-in runtime is `tests.fake_runtime.FakeRuntime`.
"""

from __future__ import annotations

import threading

import prometheus_client

from convserve.server import api


class FakeMetrics:
    """Records each request's accounting. Servers call it from their own threads:
    read the lists under `lock` while a server may still be writing them."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "convserve_requests",
            "Requests by protocol, RPC and status code.",
            ["protocol", "rpc", "code"],
            registry=self.registry,
        )
        self.lock = threading.Lock()
        # (protocol, rpc) of each started request.
        self.started: list[tuple[str, str]] = []
        # (protocol, rpc, code) of each finished request.
        self.finished: list[tuple[str, str, str]] = []
        # (protocol, rpc, model label, code) of each finished request; `labelled.count(...)`
        # counts one kind of call.
        self.labelled: list[tuple[str, str, str, str]] = []

    def request_started(self, protocol: str, rpc: str, model: str = "") -> None:
        with self.lock:
            self.started.append((protocol, rpc))

    def request_finished(
        self, protocol: str, rpc: str, code: str, seconds: float, model: str = ""
    ) -> None:
        assert seconds >= 0
        with self.lock:
            self.finished.append((protocol, rpc, code))
            self.labelled.append((protocol, rpc, model, code))
        self.requests.labels(protocol, rpc, code).inc()


# mypy proves the fake has every method of the request accounting interface, with its signature.
_: api.RequestMetrics = FakeMetrics()
