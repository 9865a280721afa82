"""Input normalization against a model's input shape and MNIST-style preparation of files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convserve.client.errors import InputError
from convserve.client.images import (
    accepted_shapes,
    image_batch,
    load_grayscale,
    mnist_preprocess,
    prepare_image,
    single_image,
)
from convserve.v1 import images as shared
from convserve.v1.images import MAX_IMAGE_PIXELS

MNIST = (28, 28, 1)


@pytest.mark.parametrize(
    ("model", "shape", "count"),
    [
        (MNIST, (5, 28, 28), 5),
        (MNIST, (5, 28, 28, 1), 5),
        (MNIST, (5, 784), 5),
        (MNIST, (28, 28), 1),
        (MNIST, (28, 28, 1), 1),
        (MNIST, (784,), 1),
        (MNIST, (1, 28, 28), 1),
        ((8, 8, 1), (3, 8, 8), 3),
        ((8, 8, 1), (8, 8), 1),
        ((8, 8, 1), (2, 64), 2),
        ((4, 4, 3), (2, 4, 4, 3), 2),
        ((4, 4, 3), (4, 4, 3), 1),
        ((4, 4, 3), (2, 48), 2),
        ((4, 4, 3), (48,), 1),
    ],
)
def test_accepted_shapes_become_n_h_w_c(
    model: tuple[int, int, int], shape: tuple[int, ...], count: int
) -> None:
    pixels = np.arange(np.prod(shape)).reshape(shape) % 256
    batch = image_batch(pixels.astype(np.uint8), model)
    assert batch.shape == (count, *model)
    # Reshaping only: the pixel order is kept.
    np.testing.assert_array_equal(batch.reshape(-1), pixels.reshape(-1))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (MNIST, (28, 27)),
        (MNIST, (2, 28, 28, 3)),
        (MNIST, (3, 785)),
        (MNIST, (2, 2, 28, 28)),
        (MNIST, (2, 8, 8)),  # another model's images are not resized
        ((8, 8, 1), (2, 28, 28)),
        ((4, 4, 3), (2, 4, 4)),  # [N,H,W] only for one-channel models
        ((4, 4, 3), (4, 4)),
    ],
)
def test_other_shapes_are_refused(model: tuple[int, int, int], shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match=r"images: shape must be .* \(the model's input\), got"):
        image_batch(np.zeros(shape, np.uint8), model)


def test_the_error_lists_the_shapes_the_model_takes() -> None:
    assert accepted_shapes(MNIST) == (
        "[N,28,28,1], [N,28,28], [N,784], [28,28,1], [28,28] or [784]"
    )
    assert accepted_shapes((4, 4, 3)) == "[N,4,4,3], [N,48], [4,4,3] or [48]"
    with pytest.raises(InputError, match=r"got \[2, 27, 27\]"):
        image_batch(np.zeros((2, 27, 27), np.uint8), MNIST)
    with pytest.raises(InputError, match="no images"):
        image_batch(np.zeros((0, 28, 28), np.uint8), MNIST)
    with pytest.raises(InputError, match=r"input shape: expected \(height, width, channels\)"):
        image_batch(np.zeros((1, 28, 28), np.uint8), (28, 28))  # type: ignore[arg-type]


def test_dtype_rules() -> None:
    ints = np.full((1, 28, 28), 200, dtype=np.int64)
    assert image_batch(ints, MNIST).dtype == np.uint8
    assert image_batch(ints.astype(np.float64) / 255.0, MNIST).dtype == np.float32
    assert image_batch(np.ones((1, 28, 28), bool), MNIST).max() == 255
    with pytest.raises(InputError, match=r"integer pixels must be in \[0, 255\].*-1 to 200"):
        image_batch(np.concatenate([ints, -np.ones_like(ints)]), MNIST)
    with pytest.raises(InputError, match=r"divide by 255"):
        image_batch(ints.astype(np.float32), MNIST)
    with pytest.raises(InputError, match="finite"):
        image_batch(np.full((1, 28, 28), np.nan), MNIST)
    with pytest.raises(InputError, match="must be numbers"):
        image_batch(np.full((1, 28, 28), "x"), MNIST)


def test_lists_are_joined_and_mixed_types_become_float() -> None:
    a = np.full((28, 28), 255, np.uint8)
    b = np.zeros((2, 28, 28), np.float32)
    parts: list[np.ndarray] = [a, b]
    batch = image_batch(parts, MNIST)
    assert batch.shape == (3, 28, 28, 1)
    assert batch.dtype == np.float32
    assert batch[0].max() == 1.0
    nested = image_batch(np.zeros((28, 28), np.uint8).tolist(), MNIST)
    assert nested.shape == (1, 28, 28, 1)
    assert nested.dtype == np.uint8
    with pytest.raises(InputError, match=r"images\[1\]: shape"):
        image_batch([a, np.zeros((3, 3), np.uint8)], MNIST)
    with pytest.raises(InputError, match="no images"):
        image_batch([], MNIST)


def test_single_image_refuses_batches() -> None:
    assert single_image(np.zeros((1, 784), np.uint8), MNIST).shape == (1, 28, 28, 1)
    assert single_image(np.zeros((8, 8), np.uint8), (8, 8, 1)).shape == (1, 8, 8, 1)
    with pytest.raises(InputError, match="expected one image, got 2"):
        single_image(np.zeros((2, 28, 28), np.uint8), MNIST)


def _bar_digit(height: int, width: int, *, dark_on_light: bool) -> np.ndarray:
    """A thick vertical stroke (a "1") off-centre in a larger canvas."""
    canvas = np.zeros((height, width))
    canvas[height // 5 : height - height // 10, width // 6 : width // 6 + width // 8] = 255
    return 255 - canvas if dark_on_light else canvas


@pytest.mark.parametrize("dark_on_light", [False, True])
def test_mnist_preprocess_inverts_crops_scales_and_centres(dark_on_light: bool) -> None:
    digit = mnist_preprocess(_bar_digit(200, 120, dark_on_light=dark_on_light))
    assert digit.shape == (28, 28)
    assert digit.dtype == np.uint8
    assert digit[0].max() == 0
    assert digit[:, 0].max() == 0
    ink = digit > 127
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20  # the long side fills the 20-pixel box
    assert cols[-1] - cols[0] + 1 < 10  # the aspect ratio is kept
    mass = digit.astype(np.float64)
    com_y = (mass.sum(axis=1) * np.arange(28)).sum() / mass.sum()
    com_x = (mass.sum(axis=0) * np.arange(28)).sum() / mass.sum()
    assert abs(com_y - 13.5) <= 0.75
    assert abs(com_x - 13.5) <= 0.75


def test_mnist_preprocess_ignores_paper_texture() -> None:
    rng = np.random.default_rng(0)
    paper = 230 + rng.normal(0, 4, (100, 100))  # light, slightly noisy paper
    paper[30:70, 45:55] = 20  # the stroke
    digit = mnist_preprocess(paper)
    rows = np.flatnonzero((digit > 0).any(axis=1))
    assert rows[-1] - rows[0] + 1 <= 21  # the crop followed the stroke, not the noise


def test_blank_image_gives_a_blank_digit() -> None:
    assert mnist_preprocess(np.full((50, 50), 255.0)).max() == 0
    blank = prepare_image(np.full((50, 50), 255.0), (8, 8, 1))
    assert (blank.shape, int(blank.max())) == ((8, 8, 1), 0)


def test_files_are_prepared_at_the_model_size() -> None:
    bar = _bar_digit(200, 120, dark_on_light=True)
    small = prepare_image(bar, (8, 8, 1))
    assert small.shape == (8, 8, 1)
    assert small.dtype == np.uint8
    ink = small[:, :, 0] > 127
    rows = np.flatnonzero(ink.any(axis=1))
    # The long side fills the box of 20/28 of the field: 6 of 8 pixels.
    assert rows[-1] - rows[0] + 1 == 6
    colour = prepare_image(bar, (12, 10, 3))
    assert colour.shape == (12, 10, 3)
    # Gray is copied into every channel.
    np.testing.assert_array_equal(colour[:, :, 0], colour[:, :, 2])
    np.testing.assert_array_equal(prepare_image(bar, MNIST)[:, :, 0], mnist_preprocess(bar))


def _png_bytes(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode if mode != "L" else None).save(buffer, format="PNG")
    return buffer.getvalue()


def test_png_and_jpeg_decoding(tmp_path: Path) -> None:
    gray = (np.arange(30 * 40) % 256).astype(np.uint8).reshape(30, 40)
    np.testing.assert_array_equal(load_grayscale(_png_bytes(gray)), gray)
    path = tmp_path / "digit.jpg"
    Image.fromarray(gray).convert("RGB").save(path, quality=95)
    assert np.abs(load_grayscale(path) - gray).mean() < 4.0  # lossy, but close


def test_transparent_background_counts_as_paper() -> None:
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent
    rgba[10:30, 18:22] = (0, 0, 0, 255)  # an opaque black stroke
    gray = load_grayscale(_png_bytes(rgba))
    assert gray[0, 0] == 255
    assert gray[20, 20] == 0
    digit = image_batch(_png_bytes(rgba), MNIST)
    assert digit.dtype == np.uint8
    assert digit[0, 14, 14, 0] > 200


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.png: not an image file"):
        load_grayscale(not_image)
    with pytest.raises(InputError, match=r"missing\.png: no such file"):
        load_grayscale(tmp_path / "missing.png")
    with pytest.raises(InputError, match="image bytes: not an image file"):
        load_grayscale(b"\x00\x01")


def test_the_shared_code_raises_image_errors_that_reach_clients_as_input_errors() -> None:
    # The server's console calls convserve.v1.images directly; SDK users catch InputError.
    with pytest.raises(shared.ImageError, match="image bytes: not an image file") as from_shared:
        shared.load_grayscale(b"\x00\x01")
    with pytest.raises(InputError) as from_client:
        load_grayscale(b"\x00\x01")
    assert str(from_client.value) == str(from_shared.value)
    with pytest.raises(InputError, match=r"image: expected a 2-D grayscale image"):
        prepare_image(np.zeros((3, 3, 3)), MNIST)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header declaring width x height 8-bit gray pixels, with
    an image stream far too short for them: any attempt to decode the pixels fails."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00"))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("width", "height", "pixels"),
    [
        # Beyond pillow's own limit: Image.open itself refuses it.
        (20000, 10000, "200,000,000"),
        # Below pillow's limit, above ours.
        (8000, 7000, "56,000,000"),
    ],
)
def test_huge_images_are_refused_from_the_header(
    tmp_path: Path, width: int, height: int, pixels: str
) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(width, height))
    limit = f"{MAX_IMAGE_PIXELS:,}"
    expected = rf"huge\.png: image is {width}x{height} \({pixels} pixels\), more than the limit "
    with pytest.raises(InputError, match=expected + rf"of {limit} pixels"):
        load_grayscale(path)
    with pytest.raises(InputError, match=rf"image bytes: image is {width}x{height}"):
        image_batch(path.read_bytes(), MNIST)


def test_huge_jpeg_is_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "wide.jpg"
    Image.new("L", (16, 8)).save(path)
    data = bytearray(path.read_bytes())
    # The frame header (SOF0) holds the height, then the width, as 16-bit numbers.
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 20000, 60000)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"wide\.jpg: image is 60000x20000 \(1,200,000,000 pix"):
        load_grayscale(path)


def test_images_within_the_limit_still_decode() -> None:
    side = 1000
    gray = np.zeros((side, side), np.uint8)
    assert load_grayscale(_png_bytes(gray)).shape == (side, side)
    # Below pillow's own warning threshold too, so no image within the limit warns.
    assert side * side < MAX_IMAGE_PIXELS < Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        # An IHDR chunk shorter than its 13 bytes: pillow raises ValueError.
        (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", b"\x00\x00\x00\x05\x00"), "cannot read image"),
        # A valid header over a damaged image stream.
        (png_header_only(40, 30), "cannot read image"),
        # A PNG cut off in the middle of its pixels.
        (_png_bytes(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64))[:60], "cannot read"),
    ],
    ids=["short-header", "damaged-stream", "cut-off"],
)
def test_corrupt_images_name_the_file(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(InputError, match=rf"broken\.png: {reason}"):
        load_grayscale(path)
    with pytest.raises(InputError, match=rf"image bytes: {reason}"):
        load_grayscale(content)
