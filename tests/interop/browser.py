"""A real headless Chromium (Debian's `chromium` and `chromium-driver`) for page tests.

Selenium is pointed at the system's browser and driver, so nothing is
downloaded at run time. Pages are read through the DOM and the browser's own
console log, the way a person would see them.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from tests import polling
from tests.conftest import require_tool

T = TypeVar("T")
WAIT_S = 60.0


@contextmanager
def chromium(width: int = 1400, height: int = 1800) -> Iterator[Any]:
    """A headless Chromium under chromedriver, its console log kept; quit afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        # CI runs as root, where Chromium's sandbox cannot start.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(
    driver: Any,
    condition: Callable[[Any], T],
    timeout_s: float = WAIT_S,
    what: str = "a condition on the page",
) -> T:
    """`tests.polling.wait_for` of `condition(driver)`: its first truthy value."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    # The page redraws its panels on every refresh: an element read mid-redraw is stale.
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return polling.wait_for(
        lambda: condition(driver), what=what, timeout_s=timeout_s, retry_on=ignored
    )


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser console's errors since the last call (script errors, CSP violations,
    failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def draw_digit(
    driver: Any, canvas: Any, digit: np.ndarray, *, threshold: int = 100, touch: bool = False
) -> int:
    """Draw a [H,W] digit (ink bright on black) on `canvas` as a person would with a pen
    (or, with `touch`, a finger): one horizontal stroke along each run of inked pixels of
    each row, scaled to the canvas. Returns the number of strokes."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    kind = interaction.POINTER_TOUCH if touch else interaction.POINTER_MOUSE
    # A session keeps each input source's type: the finger and the mouse need their own.
    source = PointerInput(kind, "finger" if touch else "mouse")
    builder = ActionBuilder(driver, mouse=source, duration=0)
    pointer = builder.pointer_action
    width = int(canvas.size["width"])
    height = int(canvas.size["height"])
    rows, cols = digit.shape
    step_x, step_y = width / cols, height / rows
    strokes = 0
    for y in range(rows):
        inked = np.flatnonzero(digit[y] > threshold)
        if not inked.size:
            continue
        for run in np.split(inked, np.flatnonzero(np.diff(inked) > 1) + 1):
            # Offsets are from the element's centre.
            x0 = round((run[0] + 0.5) * step_x - width / 2)
            x1 = round((run[-1] + 0.5) * step_x - width / 2)
            yy = round((y + 0.5) * step_y - height / 2)
            pointer.move_to(canvas, x0, yy).pointer_down().move_to(canvas, x1, yy).pointer_up()
            strokes += 1
    builder.perform()
    return strokes


def canvas_png(driver: Any, element_id: str) -> bytes:
    """The canvas's pixels as the PNG the page itself makes of them."""
    url = driver.execute_script(
        "return document.getElementById(arguments[0]).toDataURL('image/png');", element_id
    )
    return base64.b64decode(url.split(",", 1)[1])


def canvas_gray(driver: Any, element_id: str) -> np.ndarray:
    """The canvas's red channel, uint8 [H,W] (gray images have R = G = B)."""
    values = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
        "return [c.height, c.width, Array.from(d.data)];",
        element_id,
    )
    height, width, data = values
    return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)[..., 0]
