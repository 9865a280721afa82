"""The console: a page on the REST port to look at the server, and its two data calls.

    GET  /                              -> 302 to /console/
    GET  /console/                      the page (HTML, CSS and JS from package data)
    GET  /console/config.json           what the page needs before its first data call
    GET  /v1/convserve/traffic          the last minutes of traffic per model (`traffic`)
    POST /v1/convserve/prepare_image?model=NAME[&version=V]
                                        a PNG or JPEG -> the model's input image, prepared
                                        exactly as the CLI prepares it (the same code)

The page is plain HTML, CSS and JavaScript with no build step and no third-party
origin, so it works offline and installs with the package. Its own files are
served without a token (they hold no data); everything it shows comes from the
ordinary APIs (`/v1/convserve/...`, TF Serving's ``:predict``), which need the
token like any other client's calls and are counted, limited and timed the same.
Every page answer carries a Content-Security-Policy that allows scripts, styles
and connections to this origin only, and no inline script.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import numpy as np
from aiohttp import web

from convserve.server import api, converters, errors, types
from convserve.server.protocols.calls import REPLICA_KEY
from convserve.server.protocols.http import HttpApi, HttpCall, json_response
from convserve.server.protocols.oip_convert import parse_version
from convserve.server.settings import Settings
from convserve.server.traffic import Traffic

PREFIX = "/v1/convserve"
PAGE_PATH = "/console/"
# The page's files: name -> content type. Nothing else under /console/ is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Scripts, styles and connections from this origin only, no inline script, no framing;
# images may be data:/blob: URLs because the page draws tensors into canvases.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Revalidated on every load, so an upgraded server never runs yesterday's script.
    "Cache-Control": "no-cache",
}
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "application/octet-stream"})
# Only the two formats the CLI documents are decoded: pillow knows many more, each
# a decoder an upload could reach.
IMAGE_FORMATS = ("PNG", "JPEG")
# Decoding is bounded before any pixel is read: the CLI's own limit is for a
# workstation; a server decodes at most this many pixels (a 2000x2000 photo), one
# image at a time in its own thread, and lets only a few more wait (each holding its
# body), so a burst of uploads cannot take its memory or the shared thread pool.
PREPARE_MAX_PIXELS = 4_000_000
PREPARE_MAX_BODY_BYTES = 32 << 20
PREPARE_MAX_WAITING = 4


def assets() -> dict[str, bytes]:
    """The page's files, read once from package data."""
    folder = resources.files("convserve.server") / "console"
    return {name: (folder / name).read_bytes() for name in ASSETS}


def prepare_image_bytes(body: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """An encoded PNG or JPEG -> uint8 [H, W, C] for a model whose images are `shape`,
    by the code the CLI shares (`convserve.v1.images`): decoded with pillow, made gray,
    then prepared the MNIST way. InvalidArgument naming ``body`` when it cannot be."""
    from PIL import Image

    from convserve.v1 import images
    from convserve.v1.images import ImageError

    try:
        with Image.open(io.BytesIO(body), formats=IMAGE_FORMATS) as opened:
            width, height = opened.size
    except Image.DecompressionBombError:
        raise errors.InvalidArgument(
            "body", f"an image of at most {PREPARE_MAX_PIXELS:,} pixels expected; scale it down"
        ) from None
    except Exception:
        raise errors.InvalidArgument(
            "body", "a PNG or JPEG image expected, got bytes of neither"
        ) from None
    if width * height > PREPARE_MAX_PIXELS:
        raise errors.InvalidArgument(
            "body",
            f"an image of at most {PREPARE_MAX_PIXELS:,} pixels expected, got {width}x{height}; "
            "scale it down first",
        )
    try:
        gray = images.load_grayscale(body)
        return images.prepare_image(gray, shape)
    except ImageError as exc:
        raise errors.InvalidArgument("body", str(exc).removeprefix("image bytes: ")) from None


def image_shape(meta: types.ModelMetadata) -> tuple[int, int, int]:
    """(H, W, C) of the model's images, from its signature's first input."""
    if meta.inputs:
        shape = meta.inputs[0].shape
        if len(shape) in (3, 4) and all(d > 0 for d in shape[1:]):
            h, w, *c = shape[1:]
            return (h, w, c[0] if c else 1)
    raise errors.FailedPrecondition(
        f"model {errors.shown(meta.model_name)} does not take images [-1,H,W,C]"
    )


class Console:
    """The console page and its data calls, over the shared runtime and `traffic`."""

    def __init__(
        self,
        runtime: api.RuntimeApi,
        http: HttpApi,
        settings: Settings,
        traffic: Traffic | None,
        *,
        token_required: bool,
        replica: str = "",
    ) -> None:
        self._runtime = runtime
        self._http = http
        self._traffic = traffic
        self._assets = assets()
        self._headers = dict(PAGE_HEADERS)
        if replica:
            self._headers[REPLICA_KEY] = replica
        self._config = {
            "poll_interval_s": settings.console_poll_s,
            "token_required": token_required,
            "traffic_interval_s": settings.traffic_interval_s,
        }
        self._etags = {name: _etag(body) for name, body in self._assets.items()}
        # One decode at a time, in a thread of its own: a decode runs to its end even
        # when its caller has gone, and holds the slot until then.
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="prepare-image")
        self._prepare_slot = asyncio.Lock()
        self._prepare_waiting = 0

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self._to_page)
        router.add_get("/console", self._to_page)
        router.add_get(PAGE_PATH, self._asset)
        router.add_get(f"{PAGE_PATH}config.json", self._page_config)
        router.add_get(f"{PAGE_PATH}{{name}}", self._asset)
        route = self._http.route
        router.add_get(f"{PREFIX}/traffic", route("GetTraffic", self.traffic))
        # Counted under no model: decoding an upload is not the model's latency.
        router.add_post(f"{PREFIX}/prepare_image", route("PrepareImage", self.prepare_image))

    async def _to_page(self, request: web.Request) -> Any:
        # Relative, so that the page also works behind a proxy that adds a path prefix.
        # (aiohttp's HTTPFound would make the location absolute.)
        return web.Response(status=302, headers={**self._headers, "Location": "console/"})

    async def _asset(self, request: web.Request) -> Any:
        name = request.match_info.get("name") or "index.html"
        if name not in ASSETS:
            raise web.HTTPNotFound()
        headers = {**self._headers, "ETag": self._etags[name]}
        if request.headers.get("If-None-Match") == self._etags[name]:
            return web.Response(status=304, headers=headers)
        headers["Content-Type"] = ASSETS[name]
        return web.Response(body=self._assets[name], content_type=None, headers=headers)

    def close(self) -> None:
        """Let the decode thread end with its current image (called at shutdown)."""
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    async def _page_config(self, request: web.Request) -> Any:
        # Public: the page must know whether to ask for a token before its first data call.
        return json_response(self._config, headers=self._headers)

    async def traffic(self, call: HttpCall) -> Any:
        if self._traffic is None:
            raise errors.Unimplemented("traffic history is not kept by this server")
        return json_response(self._traffic.series())

    async def prepare_image(self, call: HttpCall) -> Any:
        query = call.request.query
        version = query.get("version")
        label = query.get("label")
        if label is not None:
            converters.check_label(label, "label")
        ref = types.ModelRef(
            name=query.get("model", ""),
            version=None if version is None else parse_version(version, "version"),
            label=label or None,
        )
        meta = self._runtime.metadata(ref)
        shape = image_shape(meta)
        number = self._runtime.version_of(ref)
        if call.request.content_length is not None and (
            call.request.content_length > PREPARE_MAX_BODY_BYTES
        ):
            raise errors.PayloadTooLarge(
                f"body: an image file of at most {PREPARE_MAX_BODY_BYTES} bytes expected, "
                f"got {call.request.content_length} bytes"
            )
        if self._prepare_waiting >= PREPARE_MAX_WAITING:
            raise errors.ResourceExhausted(
                f"prepare_image: {PREPARE_MAX_WAITING} images are already waiting to be "
                "prepared; try again shortly"
            )
        self._prepare_waiting += 1
        try:
            body = await call.body(IMAGE_TYPES)
            if not body:
                raise errors.InvalidArgument("body", "a PNG or JPEG image expected, got no bytes")
            image = await self._prepare(body, shape)
        finally:
            self._prepare_waiting -= 1
        return json_response(
            {
                "model_name": meta.model_name,
                "model_version": number,
                "shape": list(image.shape),
                "image": image,
            }
        )

    async def _prepare(self, body: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        await self._prepare_slot.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = self._prepare_pool.submit(prepare_image_bytes, body, shape)
        except BaseException:
            self._prepare_slot.release()
            raise
        # Released when the decode ends, not when its caller stops waiting for it.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._prepare_slot.release))
        return await asyncio.wrap_future(future)


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
