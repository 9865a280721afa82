"""Stand-in metrics with the real ones' request accounting signatures.

The stand-in runtime is `tests.fake_runtime.FakeRuntime`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class FakeMetrics:
    """Records each request's accounting; safe to read from another thread under `lock`."""

    started: list[tuple[str, str]] = field(default_factory=list)
    finished: list[tuple[str, str, str]] = field(default_factory=list)
    # (protocol, rpc, model label, code) of each finished request.
    labelled: list[tuple[str, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

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
