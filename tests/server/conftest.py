"""Fixtures shared by the server wire tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from convserve.server.app import RunningServer, start_server
from tests.fake_metrics import FakeMetrics
from tests.fake_runtime import FakeRuntime
from tests.server.wire_helpers import settings_for


@pytest.fixture
async def stub() -> AsyncIterator[tuple[RunningServer, FakeRuntime, FakeMetrics]]:
    """A real server on port 0 in front of a stand-in runtime, and its stand-in metrics."""
    runtime, metrics = FakeRuntime(), FakeMetrics()
    running = await start_server(settings_for(), runtime=runtime, metrics=metrics)
    try:
        yield running, runtime, metrics
    finally:
        await running.stop(0)
