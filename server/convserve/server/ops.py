"""Arbitrary-kernel 2-D convolution and kernel fitting, run with TensorFlow.

Semantics: CROSS_CORRELATION computes ``Y[i,j] = sum(X[i:i+h, j:j+w] * K) + b``;
CONVOLUTION is cross-correlation with the kernel flipped in both spatial axes.
Inputs are ``[H,W]`` with a ``[kh,kw]`` kernel (output ``[H',W']``) or
``[N,H,W,C]`` with a ``[kh,kw,C,F]`` kernel (output ``[N,H',W',F]``). Padding
follows TensorFlow: VALID (none), SAME (output ``ceil(in / stride)``, the odd
extra row/column at the bottom/right) or EXPLICIT ``(top, bottom, left, right)``.

Kernel and bias must have the input's dtype (float32 or float64); nothing is
cast silently. Each item of an ``[N,...]`` input is computed independently, so
merging same-shape requests along N gives each the result of a separate call.

Two exact routes: TensorFlow's direct convolution, and for large kernels at
stride 1 an FFT route (``tf.signal.rfft2d``), chosen by `FFT_MIN_KERNEL_ELEMENTS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tensorflow as tf

from convserve.server import errors, types

DEFAULT_MAX_ELEMENTS = 1 << 24  # 16.7 M values per tensor (64 MiB at float32)
DEFAULT_MAX_KERNEL_ELEMENTS = 1 << 20
# Multiply-adds one request may cost (the cheaper route's estimate): a few
# seconds on two CPU cores, so that one request cannot occupy the server.
DEFAULT_MAX_WORK = 2 * 10**10
# Spatial kernel size (kh*kw) from which the FFT route is used at stride 1.
# The direct route's cost grows with kh*kw, the FFT route's does not. Measured
# on 2 CPU cores (256x256 and 512x512 single-channel, 4x128x128x8 with 8
# filters; float32 and float64): the FFT route is as fast or faster from 17x17
# in every case (float32 crosses over between 15x15 and 19x19; float64
# single-channel already at 7x7, multi-channel about 13x13-17x17).
FFT_MIN_KERNEL_ELEMENTS = 289
# The FFT route holds the kernel spread to the padded input's size for every
# (channel, filter) pair; above this many values it falls back to the direct route.
FFT_MAX_KERNEL_SPECTRUM = 1 << 24

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_PADDINGS = ("VALID", "SAME", "EXPLICIT")
_MODES = ("CROSS_CORRELATION", "CONVOLUTION")


@dataclass(frozen=True)
class ConvPlan:
    """The checked geometry of one convolution (all sizes in the 4-D layout)."""

    two_d: bool
    n: int
    height: int
    width: int
    channels: int
    kernel_h: int
    kernel_w: int
    filters: int
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, bottom, left, right
    flip: bool
    out_h: int
    out_w: int

    @property
    def dilated_kernel(self) -> tuple[int, int]:
        return (
            (self.kernel_h - 1) * self.dilations[0] + 1,
            (self.kernel_w - 1) * self.dilations[1] + 1,
        )

    @property
    def padded(self) -> tuple[int, int]:
        return (
            self.height + self.pads[0] + self.pads[1],
            self.width + self.pads[2] + self.pads[3],
        )

    @property
    def output_shape(self) -> tuple[int, ...]:
        if self.two_d:
            return (self.out_h, self.out_w)
        return (self.n, self.out_h, self.out_w, self.filters)

    @property
    def use_fft(self) -> bool:
        """The automatic route choice; independent of N, so merging requests
        along N never changes how an item is computed."""
        hp, wp = self.padded
        return (
            self.strides == (1, 1)
            and self.kernel_h * self.kernel_w >= FFT_MIN_KERNEL_ELEMENTS
            and hp * wp * self.channels * self.filters <= FFT_MAX_KERNEL_SPECTRUM
        )

    @property
    def subsampled(self) -> bool:
        """Dilation with stride: computed at stride 1, then subsampled."""
        return self.strides != (1, 1) and self.dilations != (1, 1)

    def stride_one_output(self) -> tuple[int, int]:
        hp, wp = self.padded
        dh, dw = self.dilated_kernel
        return hp - dh + 1, wp - dw + 1

    def direct_work(self) -> int:
        """Multiply-adds of the direct route (it computes every stride-1 output
        when dilation and stride are combined)."""
        out_h, out_w = self.stride_one_output() if self.subsampled else (self.out_h, self.out_w)
        return self.n * out_h * out_w * self.kernel_h * self.kernel_w * self.channels * self.filters

    def fft_work(self) -> int:
        hp, wp = self.padded
        size = hp * wp
        log = max(1, math.ceil(math.log2(size)))
        return self.n * size * self.channels * self.filters + (
            (self.n * self.channels + self.channels * self.filters + self.n * self.filters)
            * size
            * log
        )

    def work(self) -> int:
        return self.fft_work() if self.use_fft else self.direct_work()


# -- validation -------------------------------------------------------------


def _check_array(field: str, value: object, expected: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise errors.InvalidArgument(field, f"a tensor {expected} expected")
    if value.dtype not in _DTYPES:
        raise errors.InvalidArgument(field, f"dtype float32 or float64 expected, got {value.dtype}")
    return value


def _check_size(field: str, value: np.ndarray, limit: int, setting: str) -> None:
    if any(d < 1 for d in value.shape):
        raise errors.InvalidArgument(
            field, f"every dimension at least 1 expected, got shape {list(value.shape)}"
        )
    if value.size > limit:
        raise errors.InvalidArgument(
            field,
            f"at most {limit} elements expected (the server's {setting}), got {value.size}",
        )


def _check_finite(field: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise errors.InvalidArgument(field, "finite values expected, got NaN or Inf")


def _check_pair(field: str, value: object) -> tuple[int, int]:
    try:
        pair = tuple(int(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise errors.InvalidArgument(
            field, f"two positive integers expected, got {value!r}"
        ) from None
    if len(pair) != 2:
        raise errors.InvalidArgument(
            field, f"two positive integers [height, width] expected, got {len(pair)} values"
        )
    if pair[0] < 1 or pair[1] < 1:
        raise errors.InvalidArgument(field, f"positive integers expected, got {list(pair)}")
    return pair[0], pair[1]


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def plan_convolution(
    input_shape: tuple[int, ...], kernel_shape: tuple[int, ...], options: types.ConvolutionOptions
) -> ConvPlan:
    """Check the options against the shapes ([H,W]+[kh,kw] or [N,H,W,C]+[kh,kw,C,F],
    already rank-checked) and work out the geometry. Raises InvalidArgument."""
    if options.mode not in _MODES:
        raise errors.InvalidArgument(
            "options.mode", f"CROSS_CORRELATION or CONVOLUTION expected, got {options.mode!r}"
        )
    strides = _check_pair("options.strides", options.strides)
    dilations = _check_pair("options.dilations", options.dilations)
    if options.padding not in _PADDINGS:
        raise errors.InvalidArgument(
            "options.padding", f"VALID, SAME or EXPLICIT expected, got {options.padding!r}"
        )
    explicit = options.explicit_padding
    if options.padding != "EXPLICIT" and explicit:
        raise errors.InvalidArgument(
            "options.explicit_padding",
            f"no explicit padding expected with padding {options.padding} "
            "(set padding to EXPLICIT to use it)",
        )
    two_d = len(input_shape) == 2
    if two_d:
        n, height, width, channels = 1, input_shape[0], input_shape[1], 1
        kernel_h, kernel_w, filters = kernel_shape[0], kernel_shape[1], 1
    else:
        n, height, width, channels = input_shape
        kernel_h, kernel_w, _, filters = kernel_shape
    dil_h = (kernel_h - 1) * dilations[0] + 1
    dil_w = (kernel_w - 1) * dilations[1] + 1
    if options.padding == "EXPLICIT":
        if explicit is None or len(explicit) != 4:
            got = "none" if explicit is None else f"{len(explicit)} values"
            raise errors.InvalidArgument(
                "options.explicit_padding",
                f"four non-negative integers [top, bottom, left, right] expected, got {got}",
            )
        pads = tuple(int(p) for p in explicit)
        if any(p < 0 for p in pads):
            raise errors.InvalidArgument(
                "options.explicit_padding", f"non-negative integers expected, got {list(pads)}"
            )
        top, bottom, left, right = pads
    elif options.padding == "SAME":
        top, bottom, _ = _same_pads(height, dil_h, strides[0])
        left, right, _ = _same_pads(width, dil_w, strides[1])
    else:
        top = bottom = left = right = 0
    padded_h, padded_w = height + top + bottom, width + left + right
    if dil_h > padded_h or dil_w > padded_w:
        raise errors.InvalidArgument(
            "kernel",
            f"a (dilated) kernel no larger than the padded input {padded_h}x{padded_w} "
            f"expected, got {dil_h}x{dil_w}",
        )
    out_h = (padded_h - dil_h) // strides[0] + 1
    out_w = (padded_w - dil_w) // strides[1] + 1
    return ConvPlan(
        two_d=two_d,
        n=n,
        height=height,
        width=width,
        channels=channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        filters=filters,
        strides=strides,
        dilations=dilations,
        pads=(top, bottom, left, right),
        flip=options.mode == "CONVOLUTION",
        out_h=out_h,
        out_w=out_w,
    )


def _check_geometry_limits(plan: ConvPlan, max_elements: int, max_work: int) -> None:
    padded_h, padded_w = plan.padded
    padded = plan.n * padded_h * padded_w * plan.channels
    if padded > max_elements:
        raise errors.InvalidArgument(
            "options.explicit_padding",
            f"a padded input of at most {max_elements} elements expected (the server's "
            f"max_conv_elements), got {padded}",
        )
    out = plan.n * plan.out_h * plan.out_w * plan.filters
    if out > max_elements:
        raise errors.InvalidArgument(
            "kernel",
            f"an output of at most {max_elements} elements expected (the server's "
            f"max_conv_elements), this request would produce {out}",
        )
    if plan.subsampled:
        h1, w1 = plan.stride_one_output()
        full = plan.n * h1 * w1 * plan.filters
        if full > max_elements:
            raise errors.InvalidArgument(
                "options.strides",
                f"at most {max_elements} elements (the server's max_conv_elements) expected "
                f"in the stride-1 output computed for dilation with stride, got {full}; "
                "use a smaller input, or a stride or a dilation of 1",
            )
    if plan.work() > max_work:
        raise errors.InvalidArgument(
            "kernel",
            f"at most {max_work:.3g} multiply-adds per request expected, this request "
            f"needs about {plan.work():.3g}; use a smaller input or kernel",
        )


def validate_convolve(
    req: types.ConvolveInput,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
    max_work: int = DEFAULT_MAX_WORK,
) -> ConvPlan:
    """Run every check `convolve` runs, without computing; returns the plan.

    Raises errors.InvalidArgument naming the offending field.
    """
    x = _check_array("input", req.input, "[H,W] or [N,H,W,C]")
    if x.ndim not in (2, 4):
        raise errors.InvalidArgument(
            "input", f"rank 2 [H,W] or rank 4 [N,H,W,C] expected, got shape {list(x.shape)}"
        )
    _check_size("input", x, max_elements, "max_conv_elements")
    k = _check_array("kernel", req.kernel, "[kh,kw] or [kh,kw,C,F]")
    if k.dtype != x.dtype:
        raise errors.InvalidArgument(
            "kernel", f"dtype {x.dtype} (the input's dtype) expected, got {k.dtype}"
        )
    if x.ndim == 2 and k.ndim != 2:
        raise errors.InvalidArgument(
            "kernel", f"rank 2 [kh,kw] with a [H,W] input expected, got shape {list(k.shape)}"
        )
    if x.ndim == 4 and k.ndim != 4:
        raise errors.InvalidArgument(
            "kernel",
            f"rank 4 [kh,kw,C,F] with a [N,H,W,C] input expected, got shape {list(k.shape)}",
        )
    _check_size("kernel", k, max_kernel_elements, "max_kernel_elements")
    if x.ndim == 4 and k.shape[2] != x.shape[3]:
        raise errors.InvalidArgument(
            "kernel",
            f"[kh,kw,C,F] with C={x.shape[3]} (the input's channels) expected, got C={k.shape[2]}",
        )
    filters = 1 if k.ndim == 2 else k.shape[3]
    if req.bias is not None:
        b = _check_array("bias", req.bias, f"[{filters}]")
        if b.dtype != x.dtype:
            raise errors.InvalidArgument(
                "bias", f"dtype {x.dtype} (the input's dtype) expected, got {b.dtype}"
            )
        allowed: tuple[tuple[int, ...], ...] = ((filters,),) if k.ndim == 4 else ((1,), ())
        if b.shape not in allowed:
            expected = f"[{filters}] (one per filter)" if k.ndim == 4 else "[1] or a scalar"
            raise errors.InvalidArgument("bias", f"shape {expected} expected, got {list(b.shape)}")
        _check_finite("bias", b)
    plan = plan_convolution(x.shape, k.shape, req.options)
    _check_geometry_limits(plan, max_elements, max_work)
    _check_finite("input", x)
    _check_finite("kernel", k)
    return plan


# -- computation ------------------------------------------------------------


def _direct(x4: tf.Tensor, k4: tf.Tensor, plan: ConvPlan) -> tf.Tensor:
    """TensorFlow's convolution; differentiable (fit_kernel uses it too)."""
    if plan.flip:
        k4 = tf.reverse(k4, axis=[0, 1])
    top, bottom, left, right = plan.pads
    pads = [[0, 0], [top, bottom], [left, right], [0, 0]]
    if plan.subsampled:
        # TensorFlow does not support dilation with stride > 1 everywhere (not on
        # CPU per its documentation): convolve at stride 1, then subsample, which
        # is exactly the strided result.
        y = tf.nn.conv2d(x4, k4, strides=1, padding=pads, dilations=list(plan.dilations))
        return y[:, :: plan.strides[0], :: plan.strides[1], :]
    return tf.nn.conv2d(
        x4, k4, strides=list(plan.strides), padding=pads, dilations=list(plan.dilations)
    )


def _fft(x4: tf.Tensor, kernel: np.ndarray, plan: ConvPlan) -> tf.Tensor:
    """Cross-correlation through 2-D real FFTs of the padded input's size.

    With an FFT as large as the padded input, circular correlation equals the
    linear one on every output that does not wrap around, which are exactly
    the VALID outputs over the padded input.
    """
    if plan.flip:
        kernel = kernel[::-1, ::-1]
    dh, dw = plan.dilations
    hp, wp = plan.padded
    spread = np.zeros((hp, wp, plan.channels, plan.filters), dtype=kernel.dtype)
    spread[: plan.dilated_kernel[0] : dh, : plan.dilated_kernel[1] : dw] = kernel
    top, bottom, left, right = plan.pads
    xp = tf.pad(x4, [[0, 0], [top, bottom], [left, right], [0, 0]])
    x_f = tf.signal.rfft2d(tf.transpose(xp, [0, 3, 1, 2]))  # [N,C,Hp,Wp/2+1]
    k_f = tf.signal.rfft2d(tf.transpose(tf.constant(spread), [2, 3, 0, 1]))  # [C,F,...]
    y_f = tf.einsum("ncuv,cfuv->nfuv", x_f, tf.math.conj(k_f))
    y = tf.signal.irfft2d(y_f, fft_length=[hp, wp])  # [N,F,Hp,Wp]
    y = y[:, :, : hp - plan.dilated_kernel[0] + 1, : wp - plan.dilated_kernel[1] + 1]
    return tf.transpose(y, [0, 2, 3, 1])


def _as_4d(x: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 2:
        return x[None, :, :, None], k[:, :, None, None]
    return x, k


def convolve(
    req: types.ConvolveInput,
    *,
    device: str = "/CPU:0",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
    max_work: int = DEFAULT_MAX_WORK,
    route: Literal["auto", "direct", "fft"] = "auto",
) -> types.ConvolveOutput:
    """Convolve (or cross-correlate) `req.input` with `req.kernel` on `device`.

    Raises errors.InvalidArgument for any bad field (see `validate_convolve`).
    `route` forces the direct or FFT computation (for tests and measurement).
    """
    plan = validate_convolve(
        req,
        max_elements=max_elements,
        max_kernel_elements=max_kernel_elements,
        max_work=max_work,
    )
    x4, k4 = _as_4d(req.input, req.kernel)
    use_fft = plan.use_fft if route == "auto" else route == "fft"
    with tf.device(device):
        if use_fft:
            y = _fft(tf.constant(x4), k4, plan)
            if plan.strides != (1, 1):
                y = y[:, :: plan.strides[0], :: plan.strides[1], :]
        else:
            y = _direct(tf.constant(x4), tf.constant(k4), plan)
        if req.bias is not None:
            y = y + tf.constant(np.reshape(req.bias, (-1,)))
        out = y.numpy()
    if plan.two_d:
        out = out[0, :, :, 0]
    return types.ConvolveOutput(output=out)


# -- kernel fitting -----------------------------------------------------------


@dataclass(frozen=True)
class _FitPlan:
    plan: ConvPlan
    x4: np.ndarray
    y4: np.ndarray
    kernel_shape: tuple[int, ...]
    learning_rate: float
    max_steps: int


def _validate_fit(
    req: types.FitKernelInput,
    *,
    default_learning_rate: float,
    max_steps: int,
    max_elements: int,
    max_kernel_elements: int,
    max_work: int,
) -> _FitPlan:
    x = _check_array("inputs", req.inputs, "[H,W], [N,H,W] or [N,H,W,C]")
    if x.ndim not in (2, 3, 4):
        raise errors.InvalidArgument(
            "inputs",
            f"rank 2 [H,W], 3 [N,H,W] or 4 [N,H,W,C] expected, got shape {list(x.shape)}",
        )
    _check_size("inputs", x, max_elements, "max_conv_elements")
    y = _check_array("targets", req.targets, "matching the inputs")
    if y.dtype != x.dtype:
        raise errors.InvalidArgument(
            "targets", f"dtype {x.dtype} (the inputs' dtype) expected, got {y.dtype}"
        )
    _check_size("targets", y, max_elements, "max_conv_elements")
    shape = tuple(int(d) for d in req.kernel_shape)
    if len(shape) not in (2, 4):
        raise errors.InvalidArgument(
            "kernel_shape", f"[kh,kw] or [kh,kw,C,F] expected, got {list(shape)}"
        )
    if any(d < 1 for d in shape):
        raise errors.InvalidArgument(
            "kernel_shape", f"positive dimensions expected, got {list(shape)}"
        )
    if x.ndim < 4 and len(shape) != 2:
        raise errors.InvalidArgument(
            "kernel_shape",
            f"[kh,kw] with single-channel inputs of rank {x.ndim} expected, got {list(shape)}",
        )
    if x.ndim == 4 and len(shape) != 4:
        raise errors.InvalidArgument(
            "kernel_shape", f"[kh,kw,C,F] with [N,H,W,C] inputs expected, got {list(shape)}"
        )
    if x.ndim == 4 and shape[2] != x.shape[3]:
        raise errors.InvalidArgument(
            "kernel_shape",
            f"[kh,kw,C,F] with C={x.shape[3]} (the inputs' channels) expected, got C={shape[2]}",
        )
    if math.prod(shape) > max_kernel_elements:
        raise errors.InvalidArgument(
            "kernel_shape",
            f"at most {max_kernel_elements} elements expected (the server's "
            f"max_kernel_elements), got {math.prod(shape)}",
        )
    x4 = {2: lambda a: a[None, :, :, None], 3: lambda a: a[:, :, :, None], 4: lambda a: a}[x.ndim](
        x
    )
    k_shape4 = shape if len(shape) == 4 else (shape[0], shape[1], 1, 1)
    plan = plan_convolution(x4.shape, k_shape4, req.options)
    plan = dataclasses.replace(plan, two_d=False)
    # Every step computes the output and its gradients: about three convolutions.
    _check_geometry_limits(plan, max_elements, max_work // 3)
    expected = {2: (plan.out_h, plan.out_w), 3: (plan.n, plan.out_h, plan.out_w)}.get(
        x.ndim, plan.output_shape
    )
    if y.shape != expected:
        raise errors.InvalidArgument(
            "targets",
            f"shape {list(expected)} (the output of a {list(shape)} kernel on the inputs "
            f"with these options) expected, got {list(y.shape)}",
        )
    y4 = y.reshape(plan.output_shape)
    lr = default_learning_rate if req.learning_rate is None else float(req.learning_rate)
    if not math.isfinite(lr) or lr <= 0:
        raise errors.InvalidArgument(
            "learning_rate", f"a positive finite number expected, got {req.learning_rate}"
        )
    steps = max_steps
    if req.max_steps is not None:
        if req.max_steps < 1:
            raise errors.InvalidArgument(
                "max_steps", f"a positive integer expected, got {req.max_steps}"
            )
        steps = min(req.max_steps, max_steps)
    if not math.isfinite(req.tolerance) or req.tolerance < 0:
        raise errors.InvalidArgument(
            "tolerance", f"a non-negative finite number expected, got {req.tolerance}"
        )
    if req.seed < 0:
        raise errors.InvalidArgument("seed", f"a non-negative integer expected, got {req.seed}")
    _check_finite("inputs", x)
    _check_finite("targets", y)
    return _FitPlan(plan, x4, y4, shape, lr, steps)


def _mse_and_step(
    x: tf.Tensor, y: tf.Tensor, k: tf.Tensor, b: tf.Tensor, lr: tf.Tensor, plan: ConvPlan
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The loss at (k, b) and the parameters after one plain SGD step."""
    with tf.GradientTape() as tape:
        tape.watch([k, b])
        loss = tf.reduce_mean(tf.square(_direct(x, k, plan) + b - y))
    grad_k, grad_b = tape.gradient(loss, [k, b])
    return loss, k - lr * grad_k, b - lr * grad_b


@functools.lru_cache(maxsize=64)
def _sgd_step(plan: ConvPlan) -> Callable[..., Any]:
    """One traced SGD step per geometry, reused by later fits with the same geometry."""
    return tf.function(functools.partial(_mse_and_step, plan=plan))


def fit_kernel(
    req: types.FitKernelInput,
    *,
    device: str = "/CPU:0",
    default_learning_rate: float = 0.03,
    max_steps: int = 1000,
    time_budget_s: float = 10.0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
    max_work: int = DEFAULT_MAX_WORK,
    clock: Callable[[], float] = time.monotonic,
) -> types.FitKernelOutput:
    """Learn a kernel (and optionally a bias per filter) mapping inputs to targets.

    Gradient descent on the mean squared error with plain SGD
    (``w -= lr * grad``), starting from a normal kernel drawn with `req.seed`
    (std ``1/sqrt(kh*kw*C)``) and a zero bias. Stops when the loss is at or
    below `req.tolerance` ("converged"), after the request's max_steps capped
    by `max_steps` ("max_steps"), or when `time_budget_s` has passed on
    `clock` ("time_budget"). `loss` holds the loss before each step, then
    after the last. Computes in the inputs' dtype; returns float64.
    Raises errors.InvalidArgument for bad fields or when the loss diverges.
    """
    fit = _validate_fit(
        req,
        default_learning_rate=default_learning_rate,
        max_steps=max_steps,
        max_elements=max_elements,
        max_kernel_elements=max_kernel_elements,
        max_work=max_work,
    )
    plan = fit.plan
    dtype = fit.x4.dtype
    rng = np.random.default_rng(req.seed)
    fan_in = plan.kernel_h * plan.kernel_w * plan.channels
    k0 = rng.normal(0.0, 1.0 / math.sqrt(fan_in), size=fit.kernel_shape).astype(dtype)
    k_shape4 = (plan.kernel_h, plan.kernel_w, plan.channels, plan.filters)
    started = clock()
    losses: list[float] = []
    steps = 0
    stop_reason: Literal["converged", "max_steps", "time_budget"]
    with tf.device(device):
        x = tf.constant(fit.x4)
        y = tf.constant(fit.y4)
        k = tf.constant(k0.reshape(k_shape4))
        b = tf.zeros([plan.filters], dtype=dtype)
        lr = tf.constant(fit.learning_rate, dtype=dtype)
        while True:
            loss, new_k, new_b = _sgd_step(plan)(x, y, k, b, lr)
            value = float(loss.numpy())
            losses.append(value)
            if not math.isfinite(value):
                raise errors.InvalidArgument(
                    "learning_rate",
                    f"a smaller learning rate expected: the loss diverged after {steps} "
                    f"steps with learning rate {fit.learning_rate}",
                )
            if value <= req.tolerance:
                stop_reason = "converged"
                break
            if steps >= fit.max_steps:
                stop_reason = "max_steps"
                break
            if clock() - started >= time_budget_s:
                stop_reason = "time_budget"
                break
            k = new_k
            if req.fit_bias:
                b = new_b
            steps += 1
        kernel = k.numpy().astype(np.float64).reshape(fit.kernel_shape)
        bias = b.numpy().astype(np.float64) if req.fit_bias else None
    return types.FitKernelOutput(
        kernel=kernel, bias=bias, loss=losses, steps=steps, stop_reason=stop_reason
    )
