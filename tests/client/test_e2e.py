"""The client against the real server, started in this process on free ports."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convserve.client import (
    AsyncConvServeClient,
    ConvServeClient,
    InvalidArgumentError,
    TlsConfig,
    UnauthenticatedError,
    UnavailableError,
)
from convserve.client.cli import main
from tests.reference import IMAGE7, K2, X3, edge_image, edge_response
from tests.reference import W7 as W3
from tests.reference import Y7 as EXPECTED7

from .conftest import Certs

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180.0


def edge_pair() -> tuple[np.ndarray, np.ndarray]:
    """A 6x8 image of ones with columns 2-5 zero, and its [[1,-1]] response."""
    return edge_image(), edge_response()


@dataclass
class ServerThread:
    """A real server running on its own event loop in a background thread."""

    port: int
    metrics_port: int
    loop: asyncio.AbstractEventLoop
    stop_event: asyncio.Event
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(timeout=60)


def start_server_thread(**settings: Any) -> ServerThread:
    from convserve.server.app import start_server
    from convserve.server.settings import Settings

    started = threading.Event()
    box: dict[str, Any] = {}

    async def run() -> None:
        try:
            running = await start_server(
                Settings(host="127.0.0.1", port=0, metrics_port=0, **settings)
            )
        except BaseException as exc:
            box["error"] = exc
            started.set()
            raise
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        box["running"] = running
        started.set()
        await box["stop"].wait()
        await running.stop(0.5)

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(START_TIMEOUT_S), "the server did not start in time"
    if "error" in box:
        raise box["error"]
    running = box["running"]
    return ServerThread(running.port, running.metrics_port, box["loop"], box["stop"], thread)


@pytest.fixture(scope="module")
def server(model_base_path: Path) -> Iterator[ServerThread]:
    running = start_server_thread(model_base_path=str(model_base_path))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def secure_server(
    model_base_path: Path, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text("e2e-token\n")
    running = start_server_thread(
        model_base_path=str(model_base_path),
        tls_cert=str(certs.server_cert),
        tls_key=str(certs.server_key),
        auth_token_file=str(token_file),
    )
    yield running
    running.stop()


# --- Every method, sync and async -------------------------------------------------------------


def test_sync_every_method(server: ServerThread, sample_digits: tuple) -> None:
    images, labels = sample_digits
    with ConvServeClient(server.target) as client:
        assert client.health() == "SERVING"
        meta = client.metadata()
        assert meta.model_name == "mnist"
        assert meta.serving_version in meta.loaded_versions
        assert meta.layers
        assert meta.training.total_parameters == sum(layer.parameters for layer in meta.layers)

        as_uint8 = client.predict(images[:50])
        as_float = client.predict(images[:50].astype(np.float32) / 255.0)
        assert as_uint8.model_version == meta.serving_version
        np.testing.assert_allclose(as_uint8.probabilities, as_float.probabilities, atol=1e-5)
        np.testing.assert_allclose(as_uint8.probabilities.sum(axis=1), 1.0, atol=1e-4)
        assert (as_uint8.digits == labels[:50]).mean() >= 0.8

        np.testing.assert_allclose(client.convolve(X3, K2), [[19, 25], [37, 43]])
        np.testing.assert_allclose(client.convolve(IMAGE7, W3, bias=1), EXPECTED7)

        maps = client.feature_maps(images[0])
        assert maps.maps
        names = [layer.name for layer in meta.layers]
        for layer, activations in maps.maps.items():
            assert layer in names
            assert activations.ndim == 3
            assert activations.dtype == np.float32
        last = list(maps.maps)[-1]
        only_last = client.feature_maps(images[0], layers=[last])
        assert list(only_last.maps) == [last]
        np.testing.assert_allclose(only_last.maps[last], maps.maps[last], atol=1e-5)


async def test_async_every_method(server: ServerThread, sample_digits: tuple) -> None:
    images, labels = sample_digits
    async with AsyncConvServeClient(server.target) as client:
        assert await client.health() == "SERVING"
        meta = await client.metadata()
        result = await client.predict(images[:20])
        assert (result.digits == labels[:20]).mean() >= 0.75
        as_float = await client.predict(images[:20].astype(np.float32) / 255.0)
        np.testing.assert_allclose(as_float.probabilities, result.probabilities, atol=1e-5)
        assert as_float.model_version == meta.serving_version
        np.testing.assert_allclose(await client.convolve(X3, K2), [[19, 25], [37, 43]])
        first = next(iter((await client.feature_maps(images[0])).maps))
        assert first in [layer.name for layer in meta.layers]
        x, y = edge_pair()
        fit = await client.fit_kernel(x, y, (1, 2), tolerance=1e-8)
        np.testing.assert_allclose(fit.kernel, [[1.0, -1.0]], atol=0.05)


def test_reference_examples(server: ServerThread) -> None:
    x, y = edge_pair()
    with ConvServeClient(server.target) as client:
        np.testing.assert_array_equal(client.convolve(X3, K2), [[19, 25], [37, 43]])
        np.testing.assert_array_equal(client.convolve(IMAGE7, W3, bias=1), EXPECTED7)
        np.testing.assert_array_equal(client.convolve(x, [[1, -1]]), y)
        flipped = client.convolve(X3, K2, mode="convolution")
        np.testing.assert_array_equal(flipped, [[5, 11], [23, 29]])
        fit = client.fit_kernel(x, y, (1, 2), tolerance=1e-8)
        np.testing.assert_allclose(fit.kernel, [[1.0, -1.0]], atol=0.05)
        assert fit.loss[-1] < fit.loss[0]


def test_batch_splitting_preserves_order(server: ServerThread, sample_digits: tuple) -> None:
    images, _ = sample_digits
    count = min(len(images), 45)
    with ConvServeClient(server.target) as whole:
        once = whole.predict(images[:count])
    with ConvServeClient(server.target, max_batch_images=7) as split:
        parts = split.predict(images[:count])
    assert parts.digits.tolist() == once.digits.tolist()
    np.testing.assert_allclose(parts.probabilities, once.probabilities, atol=1e-5)


def test_invalid_argument_names_the_field_and_is_not_retried(server: ServerThread) -> None:
    before = _requests_with_code(server, "INVALID_ARGUMENT")
    with (
        ConvServeClient(server.target, retries=5) as client,
        pytest.raises(InvalidArgumentError) as caught,
    ):
        client.convolve(np.ones((2, 2)), np.ones((3, 3)))
    assert "kernel" in caught.value.details
    assert caught.value.attempts == 1
    assert _requests_with_code(server, "INVALID_ARGUMENT") == before + 1


def _requests_with_code(server: ServerThread, code: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("convserve_requests_total{") and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- Image files --------------------------------------------------------------------------------


def _png(array: np.ndarray, path: Path | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    if path is not None:
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _renderings(digit: np.ndarray) -> dict[str, bytes]:
    """One held-out digit as a user might have it: PNG as-is, inverted, larger, JPEG."""
    big = np.asarray(Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BILINEAR))
    framed = np.full((160, 120), 255, np.uint8)
    framed[30:142, 4:116] = big  # off-centre on a larger white page
    jpeg = io.BytesIO()
    Image.fromarray(framed).save(jpeg, format="JPEG", quality=90)
    return {
        "white_on_black": _png(digit),
        "black_on_white": _png(255 - digit),
        "large_on_page": _png(framed),
        "jpeg": jpeg.getvalue(),
    }


def test_png_digits_predict_the_right_digit(server: ServerThread, sample_digits: tuple) -> None:
    images, labels = sample_digits
    count = min(len(images), 40)
    with ConvServeClient(server.target) as client:
        reference = (client.predict(images[:count]).digits == labels[:count]).mean()
        for kind in ("white_on_black", "black_on_white", "large_on_page", "jpeg"):
            files = [_renderings(images[i])[kind] for i in range(count)]
            accuracy = (client.predict(files).digits == labels[:count]).mean()
            assert accuracy >= min(reference - 0.1, 0.8), (kind, accuracy, reference)


def test_cli_against_the_real_server(
    server: ServerThread,
    sample_digits: tuple,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    images, labels = sample_digits
    npz = tmp_path / "digits.npz"
    np.savez(npz, images=images[:10], labels=labels[:10])
    png = tmp_path / "digit.png"
    _png(255 - images[0], png)
    target = ["--target", server.target]
    assert main(["health", *target]) == 0
    assert main(["predict", str(npz), str(png), *target, "--json"]) == 0
    capsys.readouterr()
    assert main(["metadata", *target]) == 0
    assert "Total params:" in capsys.readouterr().out
    assert main(["feature-maps", str(png), "--output", str(tmp_path / "maps"), *target]) == 0
    assert list((tmp_path / "maps").glob("*.png"))
    x, y = edge_pair()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    fit = ["fit-kernel", "--inputs", str(tmp_path / "x.npy"), "--targets", str(tmp_path / "y.npy")]
    capsys.readouterr()
    assert main([*fit, "--kernel-shape", "1,2", "--tolerance", "1e-8", "--json", *target]) == 0
    kernel = json.loads(capsys.readouterr().out)["kernel"]
    np.testing.assert_allclose(kernel, [[1.0, -1.0]], atol=0.05)
    bench = ["bench", *target, "--duration-s", "0.5", "--warmup-s", "0.2", "--json"]
    assert main([*bench, "--concurrency", "2", "--images-per-request", "4"]) == 0
    phase = json.loads(capsys.readouterr().out)["phases"][0]
    assert phase["errors"] == {}
    assert phase["requests_ok"] > 0


def test_bench_open_loop_and_open_inference_protocol(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = ["bench", "--target", server.target, "--duration-s", "0.5", "--warmup-s", "0.2"]
    assert main([*bench, "--rate", "40", "--json", "--no-progress"]) == 0
    phase = json.loads(capsys.readouterr().out)["phases"][0]
    assert phase["errors"] == {}
    assert phase["requests_ok"] > 0
    oip = [*bench, "--protocol", "oip", "--model", "mnist", "--images-per-request", "3"]
    assert main([*oip, "--concurrency", "2", "--json", "--no-progress"]) == 0
    phase = json.loads(capsys.readouterr().out)["phases"][0]
    assert phase["errors"] == {}
    assert phase["images_per_s"] == pytest.approx(3 * phase["requests_per_s"], rel=1e-3)


# --- TLS and token authentication -----------------------------------------------------------------


def test_tls_and_token(secure_server: ServerThread, certs: Certs, sample_digits: tuple) -> None:
    images, _ = sample_digits
    tls = TlsConfig(root_ca=certs.ca)
    with ConvServeClient(secure_server.target, tls=tls, token="e2e-token") as client:
        assert client.predict(images[:3]).digits.shape == (3,)
    for token in ("wrong-token", None):
        with (
            ConvServeClient(secure_server.target, tls=tls, token=token) as client,
            pytest.raises(UnauthenticatedError),
        ):
            client.metadata()
    with (
        ConvServeClient(secure_server.target, token="e2e-token", retries=0) as plaintext,
        pytest.raises(UnavailableError),
    ):
        plaintext.metadata()


def test_cli_tls_and_token(
    secure_server: ServerThread, certs: Certs, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["metadata", "--target", secure_server.target, "--tls-ca", str(certs.ca)]
    assert main([*base, "--token", "e2e-token"]) == 0
    assert main([*base, "--token", "nope"]) == 5
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- The bare install -------------------------------------------------------------------------

# What `pip install .` needs of the checkout.
_DISTRIBUTION_FILES = ("pyproject.toml", "README.md", "client", "proto", "server", "trainer")


def test_bare_install_is_a_working_thin_client(
    server: ServerThread, sample_digits: tuple, tmp_path: Path
) -> None:
    """`pip install .` in a fresh venv: no TensorFlow, and the CLI talks to a real server."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    # A copy, so that the build's by-products never land in the checkout.
    source = tmp_path / "src"
    source.mkdir()
    for name in _DISTRIBUTION_FILES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, cli = venv / "bin" / "python", venv / "bin" / "convserve"
    constraints = REPO_ROOT / ".ci" / "constraints.txt"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"convserve", "grpcio", "protobuf", "numpy"} <= installed
    assert not installed & {"tensorflow", "tensorflow-cpu", "keras", "tritonclient", "pillow"}
    check = "import convserve.client, sys; assert 'tensorflow' not in sys.modules"
    subprocess.run([str(python), "-c", check], check=True, timeout=60)

    images, labels = sample_digits
    npz = tmp_path / "digits.npz"
    np.savez(npz, images=images[:8], labels=labels[:8])
    target = ["--target", server.target]
    health = subprocess.run(
        [str(cli), *target, "health"], capture_output=True, text=True, timeout=60, check=False
    )
    assert health.returncode == 0, health.stdout + health.stderr
    assert "SERVING" in health.stdout
    predicted = subprocess.run(
        [str(cli), *target, "--json", "predict", str(npz)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    with ConvServeClient(server.target) as client:
        expected = client.predict(images[:8]).digits
    digits = [p["digit"] for p in json.loads(predicted.stdout)["predictions"]]
    assert digits == [int(d) for d in expected]
