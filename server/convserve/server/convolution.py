"""Arbitrary-kernel 2-D convolution, run with TensorFlow.

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

Cost: a request is admitted only when `costs.CALIBRATED` estimates it at no
more than ``max_cpu_s`` CPU seconds. Work estimated above `costs.UNIT_S` is
computed in tiles (ranges of items, output rows and columns, filters), each
from its own slice of the padded input, and a `check` callback runs between
tiles, so a caller that has gone or whose deadline has passed stops costing
CPU within about one unit.

`kernel_fit` builds on the checks, the plan and the direct route defined here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tensorflow as tf

from convserve.server import costs, errors, types

DEFAULT_MAX_ELEMENTS = 1 << 24  # 16.7 M values per tensor (64 MiB at float32)
DEFAULT_MAX_KERNEL_ELEMENTS = 1 << 20
# Estimated CPU seconds one request may cost (the server's max_request_cpu_s).
DEFAULT_MAX_CPU_S = 2.0
# TensorFlow takes strides, dilations and paddings as int32 attributes, and
# aborts the process on larger values.
INT32_MAX = 2**31 - 1
# Called between units of work; raises (a ServeError) to stop the work.
Check = Callable[[], None]
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
    # Computed in float64 (else float32): the cost model charges it more.
    float64: bool = False

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


# -- validation -------------------------------------------------------------


def check_array(field: str, value: object, expected: str) -> np.ndarray:
    """`value` as an array of a served dtype, else InvalidArgument on `field`."""
    if not isinstance(value, np.ndarray):
        raise errors.InvalidArgument(field, f"a tensor {expected} expected")
    if value.dtype not in _DTYPES:
        raise errors.InvalidArgument(field, f"dtype float32 or float64 expected, got {value.dtype}")
    return value


def check_size(field: str, value: np.ndarray, limit: int, setting: str) -> None:
    """Raise InvalidArgument on `field` for an empty dimension or over `limit` elements."""
    if any(d < 1 for d in value.shape):
        raise errors.InvalidArgument(
            field, f"every dimension at least 1 expected, got shape {list(value.shape)}"
        )
    if value.size > limit:
        raise errors.InvalidArgument(
            field,
            f"at most {limit} elements expected (the server's {setting}), got {value.size}",
        )


def check_finite(field: str, value: np.ndarray) -> None:
    """Raise InvalidArgument on `field` if `value` holds NaN or Inf."""
    if not np.all(np.isfinite(value)):
        raise errors.InvalidArgument(field, "finite values expected, got NaN or Inf")


def _check_pair(field: str, value: object) -> tuple[int, int]:
    try:
        pair = tuple(int(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise errors.InvalidArgument(
            field, f"two positive integers expected, got {errors.shown(value)}"
        ) from None
    if len(pair) != 2:
        raise errors.InvalidArgument(
            field, f"two positive integers [height, width] expected, got {len(pair)} values"
        )
    if not (1 <= pair[0] <= INT32_MAX and 1 <= pair[1] <= INT32_MAX):
        raise errors.InvalidArgument(
            field, f"positive integers up to {INT32_MAX} expected, got {list(pair)}"
        )
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
            "options.mode",
            f"CROSS_CORRELATION or CONVOLUTION expected, got {errors.shown(options.mode)}",
        )
    strides = _check_pair("options.strides", options.strides)
    dilations = _check_pair("options.dilations", options.dilations)
    if options.padding not in _PADDINGS:
        raise errors.InvalidArgument(
            "options.padding",
            f"VALID, SAME or EXPLICIT expected, got {errors.shown(options.padding)}",
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
        if any(not 0 <= p <= INT32_MAX for p in pads):
            raise errors.InvalidArgument(
                "options.explicit_padding",
                f"non-negative integers up to {INT32_MAX} expected, got {list(pads)}",
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


def check_geometry_limits(plan: ConvPlan, max_elements: int) -> None:
    """Raise InvalidArgument if the padded input or an output of `plan` (the stride-1
    one too, for dilation with stride) is over `max_elements`."""
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


def _check_cost(field: str, what: str, estimate_s: float, max_cpu_s: float) -> None:
    if estimate_s > max_cpu_s:
        raise errors.InvalidArgument(
            field,
            f"at most {max_cpu_s:g} s of CPU per request expected (the server's "
            f"max_request_cpu_s), {what} needs about {estimate_s:.3g} s; "
            "use a smaller input or kernel",
        )


def convolve_cost_s(
    plan: ConvPlan,
    route: Literal["auto", "direct", "fft"] = "auto",
    model: costs.CostModel = costs.CALIBRATED,
    unit_s: float = costs.UNIT_S,
) -> float:
    """Estimated CPU seconds of computing `plan` by `route`, in the tiles `convolve`
    splits it into (at most MAX_TILING_OVERHEAD times the untiled call)."""
    fft = plan.use_fft if route == "auto" else route == "fft"
    return _tile_size(plan, fft, unit_s, model)[1]


def validate_convolve(
    req: types.ConvolveInput,
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
    max_cpu_s: float = DEFAULT_MAX_CPU_S,
    route: Literal["auto", "direct", "fft"] = "auto",
) -> ConvPlan:
    """Run every check `convolve` runs, without computing; returns the plan.

    Raises errors.InvalidArgument naming the offending field, also when the
    estimated cost (`convolve_cost_s`) is over `max_cpu_s`.
    """
    x = check_array("input", req.input, "[H,W] or [N,H,W,C]")
    if x.ndim not in (2, 4):
        raise errors.InvalidArgument(
            "input", f"rank 2 [H,W] or rank 4 [N,H,W,C] expected, got shape {list(x.shape)}"
        )
    check_size("input", x, max_elements, "max_conv_elements")
    k = check_array("kernel", req.kernel, "[kh,kw] or [kh,kw,C,F]")
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
    check_size("kernel", k, max_kernel_elements, "max_kernel_elements")
    if x.ndim == 4 and k.shape[2] != x.shape[3]:
        raise errors.InvalidArgument(
            "kernel",
            f"[kh,kw,C,F] with C={x.shape[3]} (the input's channels) expected, got C={k.shape[2]}",
        )
    filters = 1 if k.ndim == 2 else k.shape[3]
    if req.bias is not None:
        b = check_array("bias", req.bias, f"[{filters}]")
        if b.dtype != x.dtype:
            raise errors.InvalidArgument(
                "bias", f"dtype {x.dtype} (the input's dtype) expected, got {b.dtype}"
            )
        allowed: tuple[tuple[int, ...], ...] = ((filters,),) if k.ndim == 4 else ((1,), ())
        if b.shape not in allowed:
            expected = f"[{filters}] (one per filter)" if k.ndim == 4 else "[1]"
            raise errors.InvalidArgument("bias", f"shape {expected} expected, got {list(b.shape)}")
        check_finite("bias", b)
    plan = plan_convolution(x.shape, k.shape, req.options)
    plan = dataclasses.replace(plan, float64=x.dtype == np.float64)
    check_geometry_limits(plan, max_elements)
    _check_cost("input", "this convolution", convolve_cost_s(plan, route), max_cpu_s)
    check_finite("input", x)
    check_finite("kernel", k)
    return plan


# -- computation ------------------------------------------------------------


def direct(x4: tf.Tensor, k4: tf.Tensor, plan: ConvPlan) -> tf.Tensor:
    """TensorFlow's convolution; differentiable (fit_kernel uses it too)."""
    if plan.flip:
        k4 = tf.reverse(k4, axis=[0, 1])
    if any(plan.pads):
        # Padded explicitly, then VALID: tf.nn.conv2d's own explicit padding returns
        # garbage on the CPU for some geometries (e.g. [2,2,1,1] input, [1,2] kernel,
        # strides [1,2], padding right 1: the second output row is left unwritten).
        top, bottom, left, right = plan.pads
        x4 = tf.pad(x4, [[0, 0], [top, bottom], [left, right], [0, 0]])
    if plan.subsampled:
        # TensorFlow does not support dilation with stride > 1 everywhere (not on
        # CPU per its documentation): convolve at stride 1, then subsample, which
        # is exactly the strided result.
        y = tf.nn.conv2d(x4, k4, strides=1, padding="VALID", dilations=list(plan.dilations))
        return y[:, :: plan.strides[0], :: plan.strides[1], :]
    return tf.nn.conv2d(
        x4, k4, strides=list(plan.strides), padding="VALID", dilations=list(plan.dilations)
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


@dataclass(frozen=True)
class _Tile:
    """One unit of a tiled convolution: output ranges and the plan of its input slice."""

    items: slice
    rows: slice
    cols: slice
    filters: slice
    in_rows: slice
    in_cols: slice
    plan: ConvPlan


def _tile(
    plan: ConvPlan, n0: int, n1: int, r0: int, r1: int, c0: int, c1: int, f0: int, f1: int
) -> _Tile:
    """Output [n0:n1, r0:r1, c0:c1, f0:f1] as a VALID convolution of a padded-input slice."""
    sh, sw = plan.strides
    dh, dw = plan.dilated_kernel
    in_rows = slice(r0 * sh, (r1 - 1) * sh + dh)
    in_cols = slice(c0 * sw, (c1 - 1) * sw + dw)
    sub = dataclasses.replace(
        plan,
        two_d=False,
        n=n1 - n0,
        height=in_rows.stop - in_rows.start,
        width=in_cols.stop - in_cols.start,
        filters=f1 - f0,
        pads=(0, 0, 0, 0),
        out_h=r1 - r0,
        out_w=c1 - c0,
    )
    return _Tile(slice(n0, n1), slice(r0, r1), slice(c0, c1), slice(f0, f1), in_rows, in_cols, sub)


# Tiles may cost this much more than the untiled call, in all (their input slices
# overlap by the kernel's extent; on the FFT route each also transforms the kernel).
MAX_TILING_OVERHEAD = 1.5


def _tile_size(
    plan: ConvPlan, fft: bool, unit_s: float, model: costs.CostModel
) -> tuple[list[int], float]:
    """The tile size (items, output rows, columns, filters) and what all tiles of that
    size cost together (an upper bound: edge tiles are smaller).

    Halves items, then rows, columns and filters while a tile costs more than
    `unit_s`, but never so far that the tiles together would cost more than
    MAX_TILING_OVERHEAD times the untiled call: a tile may then stay larger
    than a unit, and the work stays within its estimate.
    """
    whole = [plan.n, plan.out_h, plan.out_w, plan.filters]

    def cost(size: list[int]) -> float:
        tile = _tile(plan, 0, size[0], 0, size[1], 0, size[2], 0, size[3])
        return model.convolve_s(tile.plan, fft=fft)

    def total(size: list[int], tile_s: float) -> float:
        return math.prod(-(-w // s) for w, s in zip(whole, size, strict=True)) * tile_s

    size = list(whole)
    tile_s = whole_s = cost(size)
    for axis in range(4):
        while size[axis] > 1 and tile_s > unit_s:
            candidate = list(size)
            candidate[axis] = (size[axis] + 1) // 2
            candidate_s = cost(candidate)
            if total(candidate, candidate_s) > MAX_TILING_OVERHEAD * whole_s:
                break
            size, tile_s = candidate, candidate_s
    return size, total(size, tile_s)


def plan_tiles(
    plan: ConvPlan,
    *,
    fft: bool,
    unit_s: float = costs.UNIT_S,
    model: costs.CostModel = costs.CALIBRATED,
) -> list[_Tile]:
    """Split `plan` into tiles of about `unit_s` estimated seconds each (see `_tile_size`)."""
    whole = (plan.n, plan.out_h, plan.out_w, plan.filters)
    size, _ = _tile_size(plan, fft, unit_s, model)
    tiles = []
    for n0, r0, c0, f0 in itertools.product(
        *(range(0, w, s) for w, s in zip(whole, size, strict=True))
    ):
        n1, r1 = min(n0 + size[0], whole[0]), min(r0 + size[1], whole[1])
        c1, f1 = min(c0 + size[2], whole[2]), min(f0 + size[3], whole[3])
        tiles.append(_tile(plan, n0, n1, r0, r1, c0, c1, f0, f1))
    return tiles


def _compute(x4: np.ndarray, k4: np.ndarray, plan: ConvPlan, fft: bool) -> tf.Tensor:
    """`plan` by one route, on one call's input (already padded when plan.pads are 0)."""
    if fft:
        y = _fft(tf.constant(x4), k4, plan)
        if plan.strides != (1, 1):
            y = y[:, :: plan.strides[0], :: plan.strides[1], :]
        return y
    return direct(tf.constant(x4), tf.constant(k4), plan)


def convolve(
    req: types.ConvolveInput,
    *,
    device: str = "/CPU:0",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = DEFAULT_MAX_KERNEL_ELEMENTS,
    max_cpu_s: float = DEFAULT_MAX_CPU_S,
    route: Literal["auto", "direct", "fft"] = "auto",
    check: Check | None = None,
    unit_s: float = costs.UNIT_S,
) -> types.ConvolveOutput:
    """Convolve (or cross-correlate) `req.input` with `req.kernel` on `device`.

    Raises errors.InvalidArgument for any bad field (see `validate_convolve`).
    `route` forces the direct or FFT computation (for tests and measurement).
    Work estimated above `unit_s` runs in tiles (`plan_tiles`); `check` is
    called before each tile and stops the work by raising.
    """
    plan = validate_convolve(
        req,
        max_elements=max_elements,
        max_kernel_elements=max_kernel_elements,
        max_cpu_s=max_cpu_s,
        route=route,
    )
    x4, k4 = _as_4d(req.input, req.kernel)
    use_fft = plan.use_fft if route == "auto" else route == "fft"
    bias = None if req.bias is None else np.reshape(req.bias, (-1,))
    tiles = plan_tiles(plan, fft=use_fft, unit_s=unit_s)
    with tf.device(device):
        if len(tiles) == 1:
            if check is not None:
                check()
            y = _compute(x4, k4, plan, use_fft)
            if bias is not None:
                y = y + tf.constant(bias)
            out = y.numpy()
        else:
            top, bottom, left, right = plan.pads
            padded = np.pad(x4, [(0, 0), (top, bottom), (left, right), (0, 0)])
            out = np.empty((plan.n, plan.out_h, plan.out_w, plan.filters), dtype=x4.dtype)
            for tile in tiles:
                if check is not None:
                    check()
                piece = padded[tile.items, tile.in_rows, tile.in_cols, :]
                y = _compute(piece, k4[:, :, :, tile.filters], tile.plan, use_fft)
                if bias is not None:
                    y = y + tf.constant(bias[tile.filters])
                out[tile.items, tile.rows, tile.cols, tile.filters] = y.numpy()
    if plan.two_d:
        out = out[0, :, :, 0]
    return types.ConvolveOutput(output=out)
