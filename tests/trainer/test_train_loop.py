"""The training loop's pieces: the images of an epoch and the line printed after it."""

from __future__ import annotations

import numpy as np

from convserve.trainer.augment import AUGMENTATIONS
from convserve.trainer.train import epoch_images, epoch_line, format_duration


def test_an_epoch_keeps_each_image_with_its_label_in_a_fresh_order() -> None:
    # Every image is filled with its own index, so the order can be read back from it.
    images = np.repeat(np.arange(200, dtype=np.uint8)[:, None, None], 28, axis=1)
    images = np.repeat(images, 28, axis=2)
    rng = np.random.default_rng(0)
    first, x_first = epoch_images(images, AUGMENTATIONS["none"], rng)
    second, _ = epoch_images(images, AUGMENTATIONS["none"], rng)
    assert sorted(first) == list(range(200))
    assert not np.array_equal(first, second)
    assert x_first.dtype == np.float32
    assert x_first.shape == (200, 28, 28, 1)
    np.testing.assert_allclose(x_first[:, 0, 0, 0] * 255, first, atol=1e-3)


def test_an_augmented_epoch_distorts_the_images_it_reorders() -> None:
    images = np.zeros((50, 28, 28), dtype=np.uint8)
    images[:, 10:18, 12:16] = 255
    order, x = epoch_images(images, AUGMENTATIONS["affine-elastic"], np.random.default_rng(1))
    assert sorted(order) == list(range(50))
    changed = [not np.array_equal(x[i, :, :, 0] * 255, images[order[i]]) for i in range(50)]
    assert np.mean(changed) > 0.9


def test_durations_read_as_seconds_minutes_or_hours() -> None:
    assert format_duration(0.4) == "0s"
    assert format_duration(42.4) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(3725) == "1h02m"


def test_the_epoch_line_gives_time_loss_and_an_eta_from_the_mean_epoch() -> None:
    line = epoch_line(4, 40, 5.04, 20.0, {"loss": 0.51234, "accuracy": 0.9})
    assert line == (
        "epoch  4/40:   5.0 s, loss 0.5123, accuracy 0.9000 (training images); "
        "20s elapsed, ETA 3m00s"
    )
