"""The console's routes on a real server in front of a stand-in runtime: the page and its
headers, its config, the traffic history from the server's own metrics, `--console false`
and the sampler's life with the server. (The page itself runs in a browser in
tests/interop/test_console.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import yarl

from convserve.server.app import start_server
from convserve.server.metrics import Metrics
from convserve.server.protocols.console import CONTENT_SECURITY_POLICY
from tests.fake_runtime import FakeRuntime
from tests.polling import until
from tests.server.wire_helpers import settings_for


async def _get(url: str | yarl.URL, **kwargs: Any) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, allow_redirects=False, **kwargs) as answer,
    ):
        # The headers as aiohttp keeps them: looked up without regard to case.
        return answer.status, answer.headers, await answer.read()


async def test_page_config_and_traffic() -> None:
    metrics = Metrics()
    running = await start_server(
        settings_for(rest_port=-1, console_poll_s=0.5, traffic_interval_s=0.1, traffic_window_s=60),
        runtime=FakeRuntime(),
        metrics=metrics,
    )
    try:
        url = running.rest_url
        status, headers, _ = await _get(f"{url}/")
        assert (status, headers["Location"]) == (302, "console/")
        status, headers, body = await _get(f"{url}/console/")
        assert status == 200
        assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert headers["X-Frame-Options"] == "DENY"
        assert b'<script src="console.js" defer></script>' in body
        # Only the page's own files: an encoded "../" is one (unknown) name, not a path.
        status, _, body = await _get(yarl.URL(f"{url}/console/..%2Fsettings.py", encoded=True))
        assert status == 404
        assert b"no such endpoint" in body
        # Revalidated by ETag: an unchanged file is not sent again.
        status, headers, _ = await _get(f"{url}/console/console.js")
        assert status == 200
        etag = headers["ETag"]
        status, _, body = await _get(f"{url}/console/console.js", headers={"If-None-Match": etag})
        assert (status, body) == (304, b"")

        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/console/config.json") as answer:
                assert await answer.json() == {
                    "poll_interval_s": 0.5,
                    "token_required": False,
                    "traffic_interval_s": 0.1,
                }
            metrics.request_finished("convserve", "Predict", "OK", 0.003, "mnist")

            async def traffic() -> dict[str, Any]:
                async with session.get(f"{url}/v1/convserve/traffic") as answer:
                    assert answer.status == 200
                    return dict(await answer.json())

            # The sampler runs with the server: the request shows in a later interval.
            series = await traffic()
            async with asyncio.timeout(60):
                while not any(
                    m["model"] == "mnist" and any(v > 0 for v in m["requests_per_s"])
                    for m in series["models"]
                ):
                    await asyncio.sleep(0.05)
                    series = await traffic()
            assert series["interval_s"] == 0.1
            assert len(series["time"]) >= 1
        # The traffic calls themselves are ordinary requests, counted as such.
        labels = {"protocol": "convserve-http", "rpc": "GetTraffic", "model": "", "code": "OK"}
        counted = metrics.registry.get_sample_value("convserve_requests_total", labels)
        assert counted is not None
        assert counted >= 2
    finally:
        await running.stop(0)
    assert running.http is not None
    assert all(task.done() for task in running.http._tasks)


async def test_console_off() -> None:
    running = await start_server(
        settings_for(rest_port=-1, console=False), runtime=FakeRuntime(), metrics=Metrics()
    )
    try:
        for path in ("/", "/console/", "/v1/convserve/traffic"):
            status, headers, body = await _get(f"{running.rest_url}{path}")
            assert status == 404, path
            assert headers["Content-Type"].startswith("application/json")
            assert b"no such endpoint" in body
        assert running.http is not None
        assert running.http._tasks == []
    finally:
        await running.stop(0)


async def test_prepare_image_decodes_one_at_a_time_and_bounds_the_wait(
    monkeypatch: Any, tmp_path: Any
) -> None:
    """A decode keeps its slot until it ends, even when its caller has gone; beyond the
    few that may wait, callers are told to come back (429)."""
    import threading

    from PIL import Image

    from convserve.server.protocols import console

    release = threading.Event()
    started: list[int] = []
    real = console.prepare_image_bytes

    def slow(body: bytes, shape: Any) -> Any:
        started.append(len(body))
        release.wait(60)
        return real(body, shape)

    monkeypatch.setattr(console, "prepare_image_bytes", slow)
    path = tmp_path / "digit.png"
    Image.new("L", (28, 28), 255).save(path)
    png = path.read_bytes()
    metrics = Metrics()
    running = await start_server(settings_for(rest_port=-1), runtime=FakeRuntime(), metrics=metrics)
    url = f"{running.rest_url}/v1/convserve/prepare_image?model=mnist"
    try:
        async with aiohttp.ClientSession() as session:

            async def prepare() -> int:
                async with session.post(
                    url, data=png, headers={"Content-Type": "image/png"}
                ) as answer:
                    return answer.status

            def inflight() -> float:
                labels = {"protocol": "convserve-http", "rpc": "PrepareImage", "model": ""}
                value = metrics.registry.get_sample_value("convserve_inflight_requests", labels)
                return value or 0.0

            first = asyncio.create_task(prepare())
            await until(lambda: bool(started), what="the first decode")
            # The first caller goes away; its decode still runs and keeps the slot.
            first.cancel()
            await until(lambda: inflight() == 0, what="the first caller gone")
            waiting = [asyncio.create_task(prepare()) for _ in range(console.PREPARE_MAX_WAITING)]
            await until(
                lambda: inflight() == console.PREPARE_MAX_WAITING, what="four callers waiting"
            )
            assert len(started) == 1
            assert await prepare() == 429
            release.set()
            assert await asyncio.gather(*waiting) == [200] * len(waiting)
            assert len(started) == len(waiting) + 1
    finally:
        release.set()
        await running.stop(0)
