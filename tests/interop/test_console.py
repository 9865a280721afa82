"""The console page in a real headless Chromium, against a real server.

Each test drives the page as a person would (draws with the pointer, clicks the
presets, types a token) and checks what it shows against the SDK and the
teaching examples: the same top classes and probabilities as the SDK for the
same pixels, the exact corr2d numbers of the 6x8 image, a learned kernel near
[1, -1], a new version in the models panel, a token asked for before any data
call. The browser's console must stay free of errors (a CSP violation or a
script error shows up there).

With CONVSERVE_CONSOLE_SCREENSHOTS=DIR, the screenshot test writes the README's
pictures of each panel into DIR (`make screenshots`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.interop.browser import (
    by_css,
    by_id,
    canvas_gray,
    canvas_png,
    chromium,
    console_errors,
    draw_digit,
    wait_for,
)
from tests.interop.loop_thread import serving

pytestmark = pytest.mark.slow

POLL_S = 0.5
TOKEN = "console-test-token"
# The 6x8 image of the edge-detection example: white sides, a black middle.
SEED = np.ones((6, 8))
SEED[:, 2:6] = 0.0


def corr2d(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The teaching material's corr2d: Y[i, j] = sum(X[i:i+h, j:j+w] * K)."""
    h, w = k.shape
    out = np.zeros((x.shape[0] - h + 1, x.shape[1] - w + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = (x[i : i + h, j : j + w] * k).sum()
    return out


def _settings(base: Path, **overrides: Any) -> Any:
    from convserve.server.settings import Settings

    values: dict[str, Any] = {
        "model_base_path": base,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "rest_port": -1,
        "poll_interval_s": POLL_S,
        "version_settle_s": 0.2,
        "console_poll_s": POLL_S,
        "traffic_interval_s": POLL_S,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def model_dir(model_base_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shared model (version 1) that tests may add versions to."""
    base = tmp_path_factory.mktemp("console") / "mnist"
    shutil.copytree(model_base_path / "1", base / "1")
    return base


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Any]:
    with serving(_settings(model_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


@pytest.fixture
def page(browser: Any, server: Any) -> Any:
    """The console, loaded afresh, with its first models refresh shown."""
    browser.get(f"{server.rest_url}/")
    wait_for(browser, lambda d: by_css(d, "#models-table tr[data-model='mnist']"))
    # The page's own first convolution has drawn: nothing it does races the test's.
    wait_for(browser, lambda d: by_css(d, "#conv-output-table td"))
    console_errors(browser)  # start each test with an empty log
    return browser


@pytest.fixture(scope="module")
def sdk(server: Any) -> Iterator[Any]:
    from convserve.client import ConvServeClient

    with ConvServeClient(f"127.0.0.1:{server.port}", timeout_s=60) as client:
        yield client


def _digit(sample_digits: tuple, index: int) -> tuple[np.ndarray, int]:
    images, labels = sample_digits
    return images[index], int(labels[index])


def _bars(driver: Any) -> list[tuple[int, float]]:
    return [
        (int(li.get_attribute("data-class-index")), float(li.get_attribute("data-probability")))
        for li in by_css(driver, "#prediction-bars li")
    ]


def _predicted(driver: Any) -> list[tuple[int, float]]:
    """Waits for the page's prediction to finish; its top classes."""
    wait_for(
        driver, lambda d: by_id(d, "prediction-summary").get_attribute("data-status") == "done"
    )
    return _bars(driver)


def _draw_and_predict(
    driver: Any, digit: np.ndarray, *, touch: bool = False
) -> list[tuple[int, float]]:
    by_id(driver, "clear-button").click()
    draw_digit(driver, by_id(driver, "draw-canvas"), digit, touch=touch)
    return _predicted(driver)


def _assert_same_as_sdk(page_top: list[tuple[int, float]], sdk_probabilities: np.ndarray) -> None:
    order = np.argsort(-sdk_probabilities, kind="stable")[: len(page_top)]
    assert [c for c, _ in page_top] == [int(c) for c in order]
    for c, p in page_top:
        assert p == pytest.approx(float(sdk_probabilities[c]), abs=1e-6)


def _numbers(driver: Any, table_id: str) -> np.ndarray:
    rows = by_css(driver, f"#{table_id} tr")
    return np.array(
        [[float(td.get_attribute("data-value")) for td in row.find_elements("css selector", "td")]
         for row in rows]
    )  # fmt: skip


# ---- the page itself -------------------------------------------------------------------


def test_page_is_served_from_the_package_with_strict_headers(server: Any) -> None:
    root = requests.get(f"{server.rest_url}/", allow_redirects=False, timeout=30)
    assert root.status_code == 302
    # Relative, so that the page works behind a proxy that adds a path prefix too.
    assert root.headers["Location"] == "console/"
    page = requests.get(f"{server.rest_url}/console/", timeout=30)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # No inline script and no other origin: every script is a file of this server.
    html = page.text
    assert html.count("<script") == 1
    assert '<script src="console.js" defer></script>' in html
    assert "http://" not in html
    assert "https://" not in html
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = requests.get(f"{server.rest_url}/console/{name}", timeout=30)
        assert asset.status_code == 200
        assert asset.headers["Content-Type"].startswith(kind)
        assert "https://" not in asset.text
    missing = requests.get(f"{server.rest_url}/console/secrets.txt", timeout=30)
    assert missing.status_code == 404
    assert "error" in missing.json()


def test_prepare_image_names_what_is_wrong(server: Any, tmp_path: Path) -> None:
    from PIL import Image

    url = f"{server.rest_url}/v1/convserve/prepare_image"
    path = tmp_path / "digit.png"
    Image.new("L", (40, 30), 255).save(path)
    png = path.read_bytes()
    as_png = {"Content-Type": "image/png"}

    ok = requests.post(f"{url}?model=mnist", data=png, headers=as_png, timeout=30)
    assert ok.status_code == 200
    body = ok.json()
    assert body["model_name"] == "mnist"
    assert body["shape"] == [28, 28, 1]
    assert body["model_version"] == 1
    # Blank paper is an empty field, as the CLI prepares it.
    assert np.asarray(body["image"]).shape == (28, 28, 1)
    assert not np.asarray(body["image"]).any()

    cases = [
        ("?model=nope", png, as_png, 404, "nope"),
        ("?model=mnist&version=x", png, as_png, 400, "version"),
        ("?model=mnist", png, {"Content-Type": "text/csv"}, 415, "Content-Type"),
        ("?model=mnist", b"", as_png, 400, "body: a PNG or JPEG image expected, got no bytes"),
        ("?model=mnist", b"GIF89a....", as_png, 400, "body: a PNG or JPEG image expected"),
        ("?model=mnist&label=no%20such", png, as_png, 400, "label"),
        ("?model=mnist&version=7", png, as_png, 404, "7"),
    ]
    for query, data, headers, status, text in cases:
        answer = requests.post(f"{url}{query}", data=data, headers=headers, timeout=30)
        assert answer.status_code == status, (query, answer.text)
        assert text in answer.json()["error"], (query, answer.text)

    gif = tmp_path / "digit.gif"
    Image.new("L", (28, 28), 255).save(gif)
    answer = requests.post(f"{url}?model=mnist", data=gif.read_bytes(), headers=as_png, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"] == "body: a PNG or JPEG image expected, got bytes of neither"

    big = tmp_path / "big.png"
    Image.new("L", (2001, 2000), 255).save(big)
    answer = requests.post(f"{url}?model=mnist", data=big.read_bytes(), headers=as_png, timeout=30)
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        "body: an image of at most 4,000,000 pixels expected, got 2001x2000; scale it down first"
    )


def test_page_loads_without_console_errors_and_shows_the_models(
    browser: Any, server: Any, model_dir: Path
) -> None:
    browser.get(f"{server.rest_url}/")
    # Read in one go: the page redraws the table when anything in it changes.
    cells, state = wait_for(
        browser,
        lambda d: d.execute_script(
            "const row = document.querySelector(\"#models-table tr[data-model='mnist']\");"
            "if (!row || !row.cells[4].textContent.includes('×')) return null;"
            "return [Array.from(row.cells, c => c.textContent),"
            "        row.querySelector(\"[data-version='1']\").dataset.state];"
        ),
    )
    assert browser.current_url.endswith("/console/")
    assert cells[0].startswith("mnist")
    assert "default" in cells[0]
    assert cells[1] == "ready"
    assert state == "AVAILABLE"
    assert cells[4].startswith("28×28×1")
    assert cells[5] == ", ".join(str(d) for d in range(10))
    # The first convolution is drawn on load too, so every panel has run its calls.
    wait_for(browser, lambda d: by_css(d, "#conv-output-table td"))
    wait_for(browser, lambda d: by_css(d, "#traffic-charts .traffic-model[data-model='mnist']"))
    assert console_errors(browser) == []


# ---- Try it ----------------------------------------------------------------------------


def test_drawn_digit_shows_the_sdks_classes_and_probabilities(
    page: Any, sdk: Any, sample_digits: tuple
) -> None:
    from convserve.v1.images import load_grayscale, prepare_image

    digit, label = _digit(sample_digits, 0)
    top = _draw_and_predict(page, digit)
    assert len(top) == 5
    assert top[0][0] == label, f"the drawn {label} was read as {top[0][0]}"

    # The same pixels through the SDK: the canvas as a PNG, prepared by the CLI's code.
    png = canvas_png(page, "draw-canvas")
    expected = prepare_image(load_grayscale(png), (28, 28, 1))[..., 0]
    np.testing.assert_array_equal(canvas_gray(page, "prepared-canvas"), expected)
    _assert_same_as_sdk(top, sdk.predict(png).probabilities[0])

    # Feature maps: one grid per convolution layer, one small image per map.
    layers = wait_for(page, lambda d: by_css(d, "#feature-maps .layer"))
    meta = sdk.metadata()
    conv_layers = [layer for layer in meta.layers if layer.type == "Conv2D"]
    assert [el.get_attribute("data-layer") for el in layers] == [c.name for c in conv_layers]
    for element, layer in zip(layers, conv_layers, strict=True):
        maps = element.find_elements("css selector", "canvas")
        assert len(maps) == min(layer.output_shape[-1], 64)
    assert console_errors(page) == []


def test_a_digit_drawn_with_a_finger(page: Any, sdk: Any, sample_digits: tuple) -> None:
    digit, label = _digit(sample_digits, 0)
    top = _draw_and_predict(page, digit, touch=True)
    assert top[0][0] == label
    _assert_same_as_sdk(top, sdk.predict(canvas_png(page, "draw-canvas")).probabilities[0])
    assert console_errors(page) == []


def test_uploaded_image_is_prepared_as_the_cli_prepares_it(
    page: Any, sdk: Any, sample_digits: tuple, tmp_path: Path
) -> None:
    from PIL import Image

    digit, label = _digit(sample_digits, 1)
    # A person's photo: dark ink on light paper, larger than the model's input.
    path = tmp_path / "digit.png"
    Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.NEAREST).save(path)
    by_id(page, "upload-input").send_keys(str(path))
    top = _predicted(page)
    _assert_same_as_sdk(top, sdk.predict(path).probabilities[0])
    assert top[0][0] == label
    assert console_errors(page) == []


def test_unreadable_upload_is_answered_with_a_clear_error(page: Any, tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(b"these are not pixels")
    by_id(page, "upload-input").send_keys(str(path))
    message = wait_for(page, lambda d: by_id(d, "try-error").text)
    assert message.startswith("body: ")
    assert "PNG or JPEG" in message
    # The failed call is a 400 in the log, and nothing else is.
    assert all("400" in entry["message"] for entry in console_errors(page))


# ---- Convolution -------------------------------------------------------------------------


def test_edge_preset_on_the_seed_image_shows_the_seeds_output(page: Any) -> None:
    by_css(page, "#kernel-presets [data-preset='edge']")[0].click()
    wait_for(page, lambda d: by_id(d, "convolve-button").get_attribute("data-status") == "done")
    np.testing.assert_array_equal(_numbers(page, "conv-input-table"), SEED)
    output = _numbers(page, "conv-output-table")
    np.testing.assert_array_equal(output, corr2d(SEED, np.array([[1.0, -1.0]])))
    shown = [[td.text for td in row.find_elements("css selector", "td")]
             for row in by_css(page, "#conv-output-table tr")]  # fmt: skip
    assert shown[0] == ["0", "1", "0", "0", "0", "-1", "0"]
    assert by_id(page, "conv-output-shape").text == "6×7"

    # Its transpose finds no horizontal edge in an image of vertical stripes.
    by_css(page, "#kernel-presets [data-preset='edge-t']")[0].click()
    wait_for(page, lambda d: by_id(d, "conv-output-shape").text == "5×8")
    assert not _numbers(page, "conv-output-table").any()
    assert console_errors(page) == []


def test_corr2d_grid_and_a_typed_kernel(page: Any) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(page, "conv-source")).select_by_value("corr2d")
    kernel = by_id(page, "kernel-input")
    kernel.clear()
    kernel.send_keys("0 1\n2 3")
    by_id(page, "convolve-button").click()
    wait_for(page, lambda d: by_id(d, "conv-output-shape").text == "2×2")
    np.testing.assert_array_equal(_numbers(page, "conv-output-table"), [[19, 25], [37, 43]])

    # True convolution flips the kernel: the same as cross-correlation with [[3,2],[1,0]].
    by_id(page, "conv-flip").click()
    wait_for(page, lambda d: _numbers(d, "conv-output-table")[0, 0] != 19)
    expected = corr2d(np.arange(9.0).reshape(3, 3), np.array([[3.0, 2.0], [1.0, 0.0]]))
    np.testing.assert_array_equal(_numbers(page, "conv-output-table"), expected)

    # A kernel that is not a grid of numbers is refused by the page, naming where.
    kernel.clear()
    kernel.send_keys("1 2\n3")
    by_id(page, "convolve-button").click()
    message = wait_for(page, lambda d: by_id(d, "conv-error").text)
    assert message == "kernel row 2: 2 values expected (as in row 1), got 1"
    assert console_errors(page) == []


def test_learn_a_kernel_converges_near_the_edge_detector(page: Any) -> None:
    by_css(page, "#kernel-presets [data-preset='edge']")[0].click()
    by_id(page, "fit-button").click()
    wait_for(page, lambda d: by_id(d, "fit-button").get_attribute("data-status") == "done")
    learned = _numbers(page, "fit-learned-table")
    assert learned.shape == (1, 2)
    np.testing.assert_allclose(learned, [[1.0, -1.0]], atol=1e-3)
    np.testing.assert_array_equal(_numbers(page, "fit-true-table"), [[1.0, -1.0]])
    final_loss = float(by_id(page, "fit-summary").get_attribute("data-final-loss"))
    assert final_loss < 1e-6
    assert console_errors(page) == []


# ---- Models and traffic ------------------------------------------------------------------


def test_new_version_appears_in_the_models_panel_within_the_poll_interval(
    page: Any, server: Any, model_dir: Path
) -> None:
    staging = model_dir.parent / "staging-2"
    shutil.copytree(model_dir / "1", staging)
    staging.rename(model_dir / "2")

    def server_serves_2(_: Any) -> bool:
        models = requests.get(f"{server.rest_url}/v1/convserve/models", timeout=30).json()
        versions = {v["version"]: v for v in models["models"][0]["versions"]}
        return 2 in versions and versions[2]["serving"]

    wait_for(page, server_serves_2, timeout_s=120)
    served_at = time.monotonic()
    version_2 = "tr[data-model='mnist'] [data-version='2'][data-state='AVAILABLE']"
    shown = wait_for(page, lambda d: [badge.text for badge in by_css(d, version_2)])
    shown_after_s = time.monotonic() - served_at
    print(f"\nversion 2 shown {shown_after_s:.2f} s after the server served it (poll {POLL_S} s)")
    assert "serving" in shown[0]
    # One page poll, plus the browser's own scheduling on a busy machine.
    assert shown_after_s < POLL_S + 5.0
    assert console_errors(page) == []


def test_traffic_panel_draws_the_servers_own_metrics(page: Any, server: Any, sdk: Any) -> None:
    def batch_of_four_shown(driver: Any) -> bool:
        # Requests of 4 images, one at a time: every batch of the interval holds 4
        # (earlier intervals may hold other batches, e.g. a new version's warm-up).
        sdk.predict(np.zeros((4, 28, 28), dtype=np.uint8))
        charts = by_css(driver, ".traffic-model[data-model='mnist'] .chart")
        return any(c.text == "batch size (mean): 4" for c in charts)

    wait_for(page, batch_of_four_shown)
    series = requests.get(f"{server.rest_url}/v1/convserve/traffic", timeout=30).json()
    mnist = next(m for m in series["models"] if m["model"] == "mnist")
    assert max(v or 0 for v in mnist["requests_per_s"]) > 0
    assert console_errors(page) == []


# ---- a token -----------------------------------------------------------------------------


def test_a_configured_token_is_required_for_data_calls(browser: Any, model_base_path: Path) -> None:
    from pydantic import SecretStr

    with serving(_settings(model_base_path, auth_token=SecretStr(TOKEN))) as running:
        url = running.rest_url
        # The page's own files hold no data and need no token; every data call does.
        assert requests.get(f"{url}/console/", timeout=30).status_code == 200
        assert requests.get(f"{url}/console/console.js", timeout=30).status_code == 200
        assert requests.get(f"{url}/console/config.json", timeout=30).json()["token_required"]
        for method, path in (
            ("GET", "/v1/convserve/models"),
            ("GET", "/v1/convserve/traffic"),
            ("POST", "/v1/convserve/prepare_image?model=mnist"),
            ("POST", "/v1/convserve/convolve"),
            ("POST", "/v1/models/mnist:predict"),
        ):
            answer = requests.request(method, f"{url}{path}", data=b"{}", timeout=30)
            assert answer.status_code == 401, path
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.get(f"{url}/v1/convserve/models", headers=headers, timeout=30).ok

        browser.get(f"{url}/console/")
        dialog = wait_for(
            browser, lambda d: by_id(d, "token-dialog").is_displayed() and by_id(d, "token-dialog")
        )
        assert not by_css(browser, "#models-table tr[data-model]")
        # Asked before any data call: no refused request in the log.
        assert console_errors(browser) == []

        by_id(browser, "token-input").send_keys("not-the-token")
        by_id(browser, "token-submit").click()
        message = wait_for(browser, lambda d: by_id(d, "token-error").text)
        assert message == "The server did not accept that token."
        assert all("401" in entry["message"] for entry in console_errors(browser))

        by_id(browser, "token-input").send_keys(TOKEN)
        by_id(browser, "token-submit").click()
        wait_for(browser, lambda d: by_css(d, "#models-table tr[data-model='mnist']"))
        assert not dialog.is_displayed()
        wait_for(browser, lambda d: by_css(d, "#conv-output-table td"))
        # The token is never shown: not in the page, not left in the input.
        assert TOKEN not in browser.page_source
        assert by_id(browser, "token-input").get_attribute("value") == ""
        assert console_errors(browser) == []


# ---- under load ----------------------------------------------------------------------------


def test_page_stays_usable_under_bench_load(
    page: Any, server: Any, sdk: Any, sample_digits: tuple
) -> None:
    digit, label = _digit(sample_digits, 0)
    _draw_and_predict(page, digit)
    idle_ms = float(by_id(page, "prediction-summary").get_attribute("data-elapsed-ms"))
    refreshes = int(by_id(page, "models-refreshed").get_attribute("data-refreshes"))

    bench = subprocess.Popen(
        [
            sys.executable, "-m", "convserve.client", "bench",
            "--target", f"127.0.0.1:{server.port}",
            "--concurrency", "16", "--duration-s", "600", "--warmup-s", "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "CONVSERVE_REST_PORT": "0"},
    )  # fmt: skip
    try:
        # The load is on once the server's traffic history shows it.
        def loaded(_: Any) -> bool:
            series = requests.get(f"{server.rest_url}/v1/convserve/traffic", timeout=30).json()
            mnist = next(m for m in series["models"] if m["model"] == "mnist")
            return bool(mnist["requests_per_s"]) and mnist["requests_per_s"][-1] > 20

        wait_for(page, loaded, timeout_s=120)
        top = _draw_and_predict(page, digit)
        loaded_ms = float(by_id(page, "prediction-summary").get_attribute("data-elapsed-ms"))
        wait_for(
            page,
            lambda d: (
                int(by_id(d, "models-refreshed").get_attribute("data-refreshes")) >= refreshes + 2
            ),
        )
        assert bench.poll() is None, "the load ended before the page was used"
    finally:
        bench.terminate()
        bench.wait(timeout=60)
    assert top[0][0] == label
    _assert_same_as_sdk(top, sdk.predict(canvas_png(page, "draw-canvas")).probabilities[0])
    print(
        f"\npage prediction: {idle_ms:.0f} ms idle, {loaded_ms:.0f} ms under bench load "
        f"at concurrency 16 ({loaded_ms / idle_ms:.1f}x)"
    )
    assert console_errors(page) == []


# ---- pictures ------------------------------------------------------------------------------


def test_screenshots_of_each_panel(
    page: Any, sdk: Any, sample_digits: tuple, tmp_path: Path
) -> None:
    out = Path(os.environ.get("CONVSERVE_CONSOLE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    digit, _ = _digit(sample_digits, 0)
    _draw_and_predict(page, digit)
    wait_for(page, lambda d: by_css(d, "#feature-maps .layer canvas"))
    by_css(page, "#kernel-presets [data-preset='edge']")[0].click()
    by_id(page, "fit-button").click()
    wait_for(page, lambda d: by_id(d, "fit-button").get_attribute("data-status") == "done")
    # A few seconds of traffic from eight callers, for the traffic panel to draw.
    images, _ = sample_digits
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: sdk.predict(images[i % len(images)]), range(1500)))
    wait_for(page, lambda d: by_css(d, ".traffic-model[data-model='mnist'] canvas"))
    from PIL import Image

    for panel in ("models", "try", "conv", "traffic"):
        element = by_id(page, f"{panel}-panel")
        page.execute_script("arguments[0].scrollIntoView();", element)
        path = out / f"console-{panel}.png"
        element.screenshot(str(path))
        with Image.open(path) as image:
            width, height = image.size
            colours = len(image.convert("RGB").getcolors(1 << 20) or [])
        assert width >= 500
        assert height >= 150
        assert colours > 8, f"{path.name} looks blank"
    assert console_errors(page) == []
