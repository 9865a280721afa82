"""Device selection: the `device` setting's forms, fake GPU lists, and this machine."""

from __future__ import annotations

import pytest

from convserve.server import device
from convserve.server.device import DeviceChoice, choose_device

TWO_GPUS = ["/physical_device:GPU:0", "/physical_device:GPU:1"]


@pytest.mark.parametrize("gpus", [None, []])
@pytest.mark.parametrize("requested", ["auto", "AUTO", " auto "])
def test_auto_without_gpus_is_the_cpu(requested: str, gpus: list[str] | None) -> None:
    choice = choose_device(requested, gpus)
    assert (choice.name, choice.kind, choice.index) == ("/CPU:0", "cpu", 0)
    assert "no GPU" in choice.reason


def test_auto_with_gpus_is_gpu_zero() -> None:
    choice = choose_device("auto", TWO_GPUS)
    assert (choice.name, choice.kind, choice.index) == ("/GPU:0", "gpu", 0)
    assert "2 GPU" in choice.reason


def test_cpu_is_the_cpu_even_with_gpus() -> None:
    assert choose_device("cpu", TWO_GPUS).name == "/CPU:0"


@pytest.mark.parametrize(
    ("requested", "name", "index"),
    [("gpu", "/GPU:0", 0), ("gpu:0", "/GPU:0", 0), ("gpu:1", "/GPU:1", 1), ("GPU:1", "/GPU:1", 1)],
)
def test_explicit_gpu(requested: str, name: str, index: int) -> None:
    choice = choose_device(requested, TWO_GPUS)
    assert (choice.name, choice.kind, choice.index) == (name, "gpu", index)
    assert TWO_GPUS[index] in choice.reason


@pytest.mark.parametrize(("requested", "gpus"), [("gpu:2", TWO_GPUS), ("gpu", []), ("gpu:0", None)])
def test_missing_gpu_names_the_setting_and_the_visible_devices(
    requested: str, gpus: list[str] | None
) -> None:
    with pytest.raises(ValueError, match=r"^device: GPU \d+ was requested") as info:
        choose_device(requested, gpus)
    message = str(info.value)
    if gpus:
        assert "/physical_device:GPU:1" in message
    else:
        assert "sees 0 GPU(s): none" in message


@pytest.mark.parametrize("requested", ["", "tpu", "gpu:", "gpu:-1", "gpu:x", "cuda:0", "/GPU:0"])
def test_malformed_values_list_the_accepted_forms(requested: str) -> None:
    with pytest.raises(ValueError, match=r"^device: expected") as info:
        choose_device(requested, TWO_GPUS)
    assert '"auto", "cpu", "gpu" or "gpu:N"' in str(info.value)


def test_configure_device_on_this_machine_follows_the_gpus_tensorflow_sees() -> None:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    choice = device.configure_device("auto")
    if gpus:
        assert (choice.name, choice.kind, choice.index) == ("/GPU:0", "gpu", 0)
        assert gpus[0].name in choice.reason
        assert device.configure_device("gpu").name == "/GPU:0"
    else:
        assert choice == DeviceChoice("/CPU:0", "cpu", 0, choice.reason)
    assert device.configure_device("cpu").name == "/CPU:0"
    # One past the last GPU TensorFlow sees (GPU 0 on a machine without any).
    with pytest.raises(ValueError, match=f"GPU {len(gpus)} was requested"):
        device.configure_device(f"gpu:{len(gpus)}")


def test_memory_info_on_the_cpu_is_absent_or_well_formed() -> None:
    info = device.memory_info(device.configure_device("cpu"))
    # TensorFlow does not track CPU memory by default: nothing to report.
    assert info is None or (set(info) == {"current", "peak"} and info["peak"] > 0)


def test_memory_info_of_a_missing_gpu_is_none() -> None:
    missing = DeviceChoice("/GPU:7", "gpu", 7, "test")
    assert device.memory_info(missing) is None


class FakeGpu:
    def __init__(self, name: str) -> None:
        self.name = name
        self.device_type = "GPU"


def test_configure_device_enables_memory_growth_on_every_gpu(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import tensorflow as tf

    gpus = [FakeGpu(name) for name in TWO_GPUS]
    grown: list[str] = []

    def set_memory_growth(gpu: FakeGpu, enable: bool) -> None:
        assert enable
        if gpu.name.endswith("1"):
            raise RuntimeError("Physical devices cannot be modified after being initialized")
        grown.append(gpu.name)

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: gpus)
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", set_memory_growth)
    with caplog.at_level("WARNING", logger="convserve.server.device"):
        choice = device.configure_device("gpu:1")
    assert (choice.name, choice.kind, choice.index) == ("/GPU:1", "gpu", 1)
    assert grown == [TWO_GPUS[0]]
    assert "could not enable memory growth on /physical_device:GPU:1" in caplog.text
    assert device.configure_device("auto").name == "/GPU:0"
