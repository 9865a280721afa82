"""Scale-out without a cluster: real servers behind a DNS name that changes under load.

A loopback DNS server stands in for a Kubernetes headless Service: it answers
one name with the addresses of the "ready replicas", real ``convserve-server``
processes on 127.0.0.2 and 127.0.0.3 (same port). One SDK client targets
``dns://127.0.0.1:DNSPORT/name:PORT`` and keeps a steady load from a few
threads. Shares are counted by the servers (their request counters on
/metrics), not by the client.

- Scale-up: a second replica and its record are added; within the servers'
  max connection age plus a margin, the client's connection ages out, it
  re-resolves, and the new replica takes a fair share of the calls.
- Scale-down: a replica's record is removed first, then it gets SIGTERM; its
  GOAWAY moves the client to the remaining replica, and not one call fails.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from convserve.client import ConvServeClient, ConvServeError
from tests.interop.loopback_dns import LoopbackDns
from tests.polling import wait_for
from tests.server.wire_helpers import (
    ServerProcess,
    kill_process,
    sample_value,
    scrape,
    start_server_process,
)

pytestmark = pytest.mark.slow

NAME = "convserve-headless.test"
FIRST, SECOND = "127.0.0.2", "127.0.0.3"
# Short enough for a quick test; production uses the 30 s default.
MAX_CONNECTION_AGE_S = 2.0
# gRPC's up to 10 % jitter on the age, a re-resolution, a connect; generous for a busy CI box.
DISCOVERY_MARGIN_S = 10.0
LOAD_THREADS = 4
# Calls (both servers together) over which a share is measured.
SHARE_WINDOW_CALLS = 300
FAIR_SHARE = 0.30
# The replicas' drain grace period: long, so that a client held on a draining replica
# until the grace ends would stand out against the second or two the scale-down takes.
GRACE_PERIOD_S = 30
# The least fraction of the scale-up call rate the client keeps up through the scale-down:
# loose, for a busy CI box, yet a client held for the grace period falls well below it.
SCALE_DOWN_RATE_FRACTION = 0.1


def _server_args(model_base_path: Path, host: str, port: int) -> list[str]:
    return [
        "--model-base-path", str(model_base_path),
        "--host", host,
        "--port", str(port),
        "--metrics-port", "0",
        "--max-connection-age-s", str(MAX_CONNECTION_AGE_S),
        "--max-concurrent-batches", "1",
        "--grace-period-s", str(GRACE_PERIOD_S),
        "--log-level", "INFO",
    ]  # fmt: skip


def _predict_count(server: ServerProcess, host: str) -> float:
    """Predict calls the server finished with OK, from its own /metrics."""
    return sample_value(
        scrape(server.metrics_port, host), "convserve_requests_total", rpc="Predict", code="OK"
    )


@dataclass
class Load:
    """Closed-loop Predict calls from a few threads sharing one client (one channel)."""

    client: ConvServeClient
    images: np.ndarray
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(LOAD_THREADS):
            thread = threading.Thread(target=self._run, args=(index,), name=f"load-{index}")
            thread.start()
            self.threads.append(thread)

    def _run(self, index: int) -> None:
        rng = np.random.default_rng(index)
        while not self.stop.is_set():
            image = self.images[rng.integers(len(self.images))][None]
            try:
                self.client.predict(image, timeout_s=30)
            except ConvServeError as exc:
                with self.lock:
                    self.failures.append(f"{time.monotonic():.3f} {exc}")
            else:
                with self.lock:
                    self.ok += 1
            # Pacing, so the load leaves CPU for starting a replica on a 2-core machine.
            self.stop.wait(0.004)

    def counts(self) -> tuple[int, int]:
        """Calls finished so far: (OK, failed)."""
        with self.lock:
            return self.ok, len(self.failures)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def _shares(
    servers: list[tuple[ServerProcess, str]], since: list[float]
) -> tuple[list[float], list[float]]:
    """Calls each server finished since `since`, and each one's share of them."""
    deltas = [
        _predict_count(server, host) - base
        for (server, host), base in zip(servers, since, strict=True)
    ]
    total = sum(deltas)
    return deltas, [delta / total if total else 0.0 for delta in deltas]


@pytest.fixture
def replicas() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        kill_process(server)


def test_traffic_follows_replicas_added_and_removed(
    model_base_path: Path,
    sample_digits: tuple[np.ndarray, np.ndarray],
    replicas: list[ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    began = time.monotonic()
    report: list[str] = []
    with LoopbackDns() as dns:
        first = start_server_process(_server_args(model_base_path, FIRST, 0))
        replicas.append(first)
        port = first.port
        dns.set_addresses(NAME, [FIRST])

        # No retries in the SDK: a call lost in a scale event would show as a failure.
        # (gRPC's own transparent retries and the channel's retry policy still apply.)
        client = ConvServeClient(dns.target(NAME, port), timeout_s=30, retries=0)
        load = Load(client, np.asarray(sample_digits[0], dtype=np.uint8))
        try:
            load.start()
            wait_for(
                lambda: _predict_count(first, FIRST) >= 50,
                timeout_s=60,
                what="load on the first replica",
            )

            # Scale-up: the new replica is ready (it prints its listening line only then),
            # and only then does DNS return it, as a headless Service does.
            second = start_server_process(_server_args(model_base_path, SECOND, port))
            replicas.append(second)
            assert second.port == port
            servers = [(first, FIRST), (second, SECOND)]

            # Until then the old replica served every call: it counts a call before its
            # reply leaves, so it has counted at least the calls the client saw finish
            # before the scrape, and at most one more per load thread (calls in flight).
            ok_before, _ = load.counts()
            first_before = _predict_count(first, FIRST)
            ok_after, failed_after = load.counts()
            assert ok_before <= first_before <= ok_after + failed_after + LOAD_THREADS, (
                f"old replica counted {first_before:.0f} calls; client saw {ok_before} to "
                f"{ok_after} OK and {failed_after} failed"
            )
            dns.set_addresses(NAME, [FIRST, SECOND])
            added = time.monotonic()
            wait_for(
                lambda: _predict_count(second, SECOND) > 0,
                timeout_s=MAX_CONNECTION_AGE_S * 1.1 + DISCOVERY_MARGIN_S,
                what="the new replica's first call (max connection age + margin)",
            )
            discovered_s = time.monotonic() - added
            window_at = time.monotonic()
            window = [_predict_count(server, host) for server, host in servers]
            wait_for(
                lambda: sum(_shares(servers, window)[0]) >= SHARE_WINDOW_CALLS,
                timeout_s=60,
                what=f"{SHARE_WINDOW_CALLS} calls after the new replica was found",
            )
            deltas, shares = _shares(servers, window)
            up_rate = sum(deltas) / (time.monotonic() - window_at)
            up_s = time.monotonic() - added
            report.append(
                f"scale-up: new replica's first call {discovered_s:.1f} s after its DNS record "
                f"(max connection age {MAX_CONNECTION_AGE_S} s); then {deltas[0]:.0f} / "
                f"{deltas[1]:.0f} calls old / new = shares {shares[0]:.0%} / {shares[1]:.0%} "
                f"({up_s:.1f} s after the record, {up_rate:.0f} calls/s); "
                f"failures so far {len(load.failures)}"
            )
            # The new replica takes a fair share, and the old one keeps one (the client
            # balances over both rather than moving everything to the newcomer).
            assert min(shares) >= FAIR_SHARE, report[-1]

            # Scale-down: DNS first (endpoint removal), then SIGTERM (the drain's GOAWAY).
            ok_at_removal, _ = load.counts()
            removed = time.monotonic()
            dns.set_addresses(NAME, [SECOND])
            removed_at = [_predict_count(server, host) for server, host in servers]
            first.process.send_signal(signal.SIGTERM)
            exit_code = first.process.wait(timeout=GRACE_PERIOD_S + 30)
            assert exit_code == 0, "".join(first.lines[-30:])
            stopped = _predict_count(second, SECOND)
            wait_for(
                lambda: _predict_count(second, SECOND) - stopped >= SHARE_WINDOW_CALLS,
                timeout_s=60,
                what="calls on the remaining replica after the other stopped",
            )
            down_s = time.monotonic() - removed
        finally:
            load.finish()
            client.close()
        after = _predict_count(second, SECOND) - removed_at[1]
        ok_down = load.ok - ok_at_removal
        down_rate = ok_down / down_s
        report.append(
            f"scale-down: removed replica exited {exit_code}; remaining replica served "
            f"{after:.0f} calls since; client calls OK {ok_down} in {down_s:.1f} s "
            f"({down_rate:.0f} calls/s), {load.ok} in all, failed {len(load.failures)} "
            f"{load.failures[:5]}; test took {time.monotonic() - began:.1f} s"
        )
    # Shown in a passing run too (CI runs `pytest -ra`, which shows captured output
    # only for failures): the shares and failure counts belong in every CI log.
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert not load.failures, report[-1]
    # The load kept going through the scale-down: zero failures means little if the
    # client sat blocked on the draining replica instead of moving on.
    assert down_rate >= SCALE_DOWN_RATE_FRACTION * up_rate, report[-1]
