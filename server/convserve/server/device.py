"""Choosing the TensorFlow device the server computes on.

The `device` setting accepts ``auto`` (the first GPU TensorFlow sees, else the
CPU), ``cpu``, ``gpu`` (= ``gpu:0``) and ``gpu:N``. `choose_device` is pure
logic; `configure_device` asks TensorFlow for its GPUs, enables memory growth
on each (so the server does not grab all GPU memory at start-up) and chooses.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

ACCEPTED_FORMS = '"auto", "cpu", "gpu" or "gpu:N" (N a GPU index)'
_GPU = re.compile(r"gpu(?::(\d+))?")


@dataclass(frozen=True)
class DeviceChoice:
    """A TensorFlow device string (e.g. "/GPU:0") and why it was chosen."""

    name: str
    kind: Literal["cpu", "gpu"]
    index: int
    reason: str


def _cpu(reason: str) -> DeviceChoice:
    return DeviceChoice(name="/CPU:0", kind="cpu", index=0, reason=reason)


def _gpu(index: int, visible: Sequence[str], reason: str) -> DeviceChoice:
    return DeviceChoice(
        name=f"/GPU:{index}", kind="gpu", index=index, reason=f"{reason} ({visible[index]})"
    )


def choose_device(requested: str, visible_gpus: Sequence[str] | None = None) -> DeviceChoice:
    """Pick the device for the `device` setting `requested`.

    `visible_gpus` are the GPUs TensorFlow sees, in index order (their names,
    e.g. "/physical_device:GPU:0"); None or empty means none. Raises
    ValueError naming the `device` setting for a malformed value or a GPU
    that does not exist.
    """
    gpus = list(visible_gpus or [])
    value = requested.strip().lower()
    if value == "auto":
        if gpus:
            return _gpu(0, gpus, f"device=auto and TensorFlow sees {len(gpus)} GPU(s)")
        return _cpu("device=auto and TensorFlow sees no GPU")
    if value == "cpu":
        return _cpu("device=cpu requested")
    match = _GPU.fullmatch(value)
    if match is None:
        raise ValueError(f"device: expected {ACCEPTED_FORMS}, got {requested!r}")
    index = int(match.group(1) or 0)
    if index >= len(gpus):
        seen = ", ".join(gpus) if gpus else "none"
        raise ValueError(
            f"device: GPU {index} was requested ({requested!r}) but TensorFlow sees "
            f"{len(gpus)} GPU(s): {seen}; use device=auto or cpu, or a visible GPU index"
        )
    return _gpu(index, gpus, f"device={requested} requested")


def configure_device(requested: str) -> DeviceChoice:
    """List TensorFlow's GPUs, enable memory growth on each, then `choose_device`.

    Call before anything runs on a GPU: TensorFlow only accepts the memory
    growth option before the GPUs are initialized (it raises RuntimeError
    afterwards, which is logged; the process then keeps TF's default).
    """
    import tensorflow as tf  # heavy: imported only by the server at start-up

    physical = tf.config.list_physical_devices("GPU")
    for gpu in physical:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError) as exc:
            log.warning("could not enable memory growth on %s: %s", gpu.name, exc)
    choice = choose_device(requested, [gpu.name for gpu in physical])
    log.info("computing on %s: %s", choice.name, choice.reason)
    return choice


def memory_info(choice: DeviceChoice) -> dict[str, int] | None:
    """Current and peak memory in bytes TensorFlow reports for the device, or None.

    TensorFlow reports this for GPUs. For the CPU it raises or, in recent
    versions, returns zeros because it does not track CPU allocations; both
    mean "not available" here.
    """
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info(choice.name.lstrip("/"))
    except (ValueError, RuntimeError, tf.errors.OpError):
        return None
    try:
        result = {"current": int(info["current"]), "peak": int(info["peak"])}
    except (KeyError, TypeError):
        return None
    if choice.kind == "cpu" and result["peak"] == 0:
        return None
    return result
