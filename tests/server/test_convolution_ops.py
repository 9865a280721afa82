"""Convolution and kernel fitting: reference examples, a NumPy reference, validation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convserve.server import convolution, costs, errors, kernel_fit, types
from tests import reference as ref

CC = types.ConvolutionOptions()


def reference(
    x: np.ndarray,
    k: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    strides: tuple[int, int] = (1, 1),
    padding: str = "VALID",
    explicit: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    flip: bool = False,
) -> np.ndarray:
    """Direct float64 loop over the kernel taps: [N,H,W,C] x [kh,kw,C,F]."""
    x = x.astype(np.float64)
    k = k.astype(np.float64)
    if flip:
        k = k[::-1, ::-1]
    _, height, width, _ = x.shape
    kh, kw, _, filters = k.shape
    sh, sw = strides
    dh, dw = dilations
    eff_h, eff_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "SAME":  # TensorFlow's rule: output ceil(in/stride), extra padding at the end
        total_h = max((math.ceil(height / sh) - 1) * sh + eff_h - height, 0)
        total_w = max((math.ceil(width / sw) - 1) * sw + eff_w - width, 0)
        explicit = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
    elif padding == "VALID":
        explicit = (0, 0, 0, 0)
    top, bottom, left, right = explicit
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (xp.shape[1] - eff_h) // sh + 1
    out_w = (xp.shape[2] - eff_w) // sw + 1
    y = np.zeros((x.shape[0], out_h, out_w, filters))
    for a in range(kh):
        for b in range(kw):
            rows = slice(a * dh, a * dh + (out_h - 1) * sh + 1, sh)
            cols = slice(b * dw, b * dw + (out_w - 1) * sw + 1, sw)
            y += xp[:, rows, cols, :] @ k[a, b]
    if bias is not None:
        y += bias.astype(np.float64).reshape(-1)
    return y


def conv(x: Any, k: Any, bias: Any = None, dtype: Any = np.float32, **options: Any) -> np.ndarray:
    b = None if bias is None else np.asarray(bias, dtype)
    req = types.ConvolveInput(
        np.asarray(x, dtype), np.asarray(k, dtype), b, types.ConvolutionOptions(**options)
    )
    return convolution.convolve(req).output


EDGE = ref.edge_image()


def test_reference_cross_correlation() -> None:
    out = conv(ref.X3, ref.K2)
    np.testing.assert_array_equal(out, ref.Y3)
    assert out.dtype == np.float32


def test_reference_image_with_bias() -> None:
    np.testing.assert_array_equal(conv(ref.IMAGE7, ref.W7, bias=1), ref.Y7)
    np.testing.assert_array_equal(conv(ref.IMAGE7, ref.W7, bias=[1], dtype=np.float64), ref.Y7)


def test_reference_edge_detection() -> None:
    np.testing.assert_array_equal(conv(EDGE, ref.EDGE_KERNEL), ref.edge_response())
    # The transposed image has horizontal edges only: the same kernel sees nothing.
    np.testing.assert_array_equal(conv(EDGE.T, [[1, -1]]), np.zeros((8, 5)))


def test_convolution_mode_flips_the_kernel() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 9))
    k = rng.normal(size=(3, 2))
    flipped = conv(x, k, dtype=np.float64, mode="CONVOLUTION")
    np.testing.assert_allclose(flipped, conv(x, k[::-1, ::-1], dtype=np.float64), rtol=1e-12)
    assert not np.allclose(flipped, conv(x, k, dtype=np.float64))
    np.testing.assert_array_equal(conv(EDGE, [[1, -1]], mode="CONVOLUTION"), -conv(EDGE, [[1, -1]]))


def test_four_d_matches_reference_with_bias() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 10, 11, 2))
    k = rng.normal(size=(3, 4, 2, 5))
    bias = rng.normal(size=5)
    out = conv(x, k, bias, dtype=np.float64, strides=(2, 1), padding="SAME")
    assert out.shape == (3, 5, 11, 5)
    assert out.dtype == np.float64
    np.testing.assert_allclose(
        out, reference(x, k, bias=bias, strides=(2, 1), padding="SAME"), rtol=1e-10, atol=1e-10
    )


def test_dilation_with_stride_is_exact() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 15, 14, 3))
    k = rng.normal(size=(3, 2, 3, 2))
    for padding in ("VALID", "SAME"):
        out = conv(x, k, dtype=np.float64, strides=(2, 3), dilations=(2, 3), padding=padding)
        ref = reference(x, k, strides=(2, 3), dilations=(2, 3), padding=padding)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, Any]:
    two_d = draw(st.booleans())
    n = 1 if two_d else draw(st.integers(1, 3))
    c = 1 if two_d else draw(st.integers(1, 3))
    f = 1 if two_d else draw(st.integers(1, 3))
    padding = draw(st.sampled_from(["VALID", "SAME", "EXPLICIT"]))
    return {
        "two_d": two_d,
        "shape": (n, draw(st.integers(1, 10)), draw(st.integers(1, 10)), c),
        "kernel": (draw(st.integers(1, 4)), draw(st.integers(1, 4)), c, f),
        "strides": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "dilations": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "padding": padding,
        "explicit": tuple(draw(st.integers(0, 3)) for _ in range(4))
        if padding == "EXPLICIT"
        else None,
        "mode": draw(st.sampled_from(["CROSS_CORRELATION", "CONVOLUTION"])),
        "dtype": draw(st.sampled_from([np.float32, np.float64])),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(deadline=None, max_examples=60)
@given(case=conv_cases())
def test_matches_numpy_reference(case: dict[str, Any]) -> None:
    rng = np.random.default_rng(case["seed"])
    dtype = case["dtype"]
    x4 = rng.uniform(-1, 1, size=case["shape"]).astype(dtype)
    k4 = rng.uniform(-1, 1, size=case["kernel"]).astype(dtype)
    bias = rng.uniform(-1, 1, size=case["kernel"][3]).astype(dtype) if case["bias"] else None
    x, k = (x4[0, :, :, 0], k4[:, :, 0, 0]) if case["two_d"] else (x4, k4)
    options = types.ConvolutionOptions(
        strides=case["strides"],
        padding=case["padding"],
        explicit_padding=case["explicit"],
        dilations=case["dilations"],
        mode=case["mode"],
    )
    req = types.ConvolveInput(x, k, bias, options)
    geometry: dict[str, Any] = {
        "strides": case["strides"],
        "padding": case["padding"],
        "explicit": case["explicit"] or (0, 0, 0, 0),
        "dilations": case["dilations"],
    }
    top, bottom, left, right = case["explicit"] or (0, 0, 0, 0)
    eff_h = (k4.shape[0] - 1) * case["dilations"][0] + 1
    eff_w = (k4.shape[1] - 1) * case["dilations"][1] + 1
    if case["padding"] != "SAME" and (
        eff_h > x4.shape[1] + top + bottom or eff_w > x4.shape[2] + left + right
    ):
        with pytest.raises(errors.InvalidArgument) as info:
            convolution.convolve(req)
        assert info.value.field == "kernel"
        return
    flip = case["mode"] == "CONVOLUTION"
    ref = reference(x4, k4, bias=bias, flip=flip, **geometry)
    # The rounding bound: the same sums over absolute values.
    bound = reference(np.abs(x4), np.abs(k4), flip=flip, **geometry) + 1
    tol = 1e-5 if dtype == np.float32 else 1e-12
    plan = convolution.validate_convolve(req)
    for route in ("direct", "fft"):
        # One call, and tiles of about a sixth of the estimate each (several tiles).
        unit_s = convolution.convolve_cost_s(plan, route) / 6
        for unit in (1.0, unit_s):
            out = convolution.convolve(req, route=route, unit_s=unit).output
            assert out.dtype == dtype
            got = out[None, :, :, None] if case["two_d"] else out
            assert got.shape == ref.shape
            assert np.all(np.abs(got - ref) <= tol * bound), (route, unit)


def test_explicit_padding_narrower_than_the_kernel_is_exact() -> None:
    # tf.nn.conv2d's own explicit padding left the second output row unwritten here.
    x = np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1, 1)
    k = np.array([[[[2.0]], [[3.0]]]], dtype=np.float32)
    for _ in range(3):  # unwritten memory differs from call to call
        out = conv(x, k, strides=(1, 2), padding="SAME")
        np.testing.assert_array_equal(out, reference(x, k, strides=(1, 2), padding="SAME"))


def test_tiles_cover_the_output_once() -> None:
    x = np.ones((4, 256, 256, 2), np.float32)
    k = np.ones((5, 4, 2, 6), np.float32)
    options = types.ConvolutionOptions(strides=(2, 3), padding="SAME", dilations=(1, 2))
    plan = convolution.validate_convolve(types.ConvolveInput(x, k, None, options))
    total = convolution.convolve_cost_s(plan)
    tiles = convolution.plan_tiles(plan, fft=False, unit_s=total / 20)
    assert len(tiles) >= 4
    covered = np.zeros((plan.n, plan.out_h, plan.out_w, plan.filters), np.int32)
    for tile in tiles:
        covered[tile.items, tile.rows, tile.cols, tile.filters] += 1
    assert np.all(covered == 1)
    assert len(convolution.plan_tiles(plan, fft=False, unit_s=total * 2)) == 1


def test_check_stops_a_tiled_convolution_between_tiles() -> None:
    x = np.ones((8, 256, 256, 1), np.float32)
    k = np.ones((3, 3, 1, 1), np.float32)
    req = types.ConvolveInput(x, k)
    plan = convolution.validate_convolve(req)
    unit = convolution.convolve_cost_s(plan) / 20
    tiles = len(convolution.plan_tiles(plan, fft=False, unit_s=unit))
    assert tiles >= 4
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise errors.DeadlineExceeded("Convolve: the deadline passed")

    with pytest.raises(errors.DeadlineExceeded):
        convolution.convolve(req, check=check, unit_s=unit)
    assert len(calls) == 3  # stopped at the third tile, not after all of them
    calls.clear()
    out = convolution.convolve(req, check=lambda: calls.append(1), unit_s=unit).output
    assert out.shape == (8, 254, 254, 1)
    assert len(calls) == tiles


@pytest.mark.parametrize(
    ("x_shape", "k_shape", "options"),
    [
        # Large dilated kernels and many filters: small tiles would recompute the kernel's
        # extent (and, on the FFT route, its spectrum) many times over.
        ((1, 256, 4096, 3), (31, 31, 3, 4), types.ConvolutionOptions(dilations=(8, 8))),
        ((1, 28, 1024, 1), (31, 31, 1, 256), types.ConvolutionOptions(padding="SAME")),
        ((1, 1024, 1024, 1), (31, 31, 1, 1), types.ConvolutionOptions((2, 2), dilations=(2, 2))),
    ],
)
def test_tiling_costs_little_more_than_one_call(
    x_shape: tuple[int, ...], k_shape: tuple[int, ...], options: types.ConvolutionOptions
) -> None:
    req = types.ConvolveInput(np.ones(x_shape, np.float32), np.ones(k_shape, np.float32))
    plan = convolution.validate_convolve(dataclasses.replace(req, options=options), max_cpu_s=100)
    whole = costs.CALIBRATED.convolve_s(plan, fft=plan.use_fft)
    tiles = convolution.plan_tiles(plan, fft=plan.use_fft)
    assert len(tiles) > 1
    tiled = sum(costs.CALIBRATED.convolve_s(t.plan, fft=plan.use_fft) for t in tiles)
    assert tiled <= convolution.MAX_TILING_OVERHEAD * whole
    # What admission charges covers the tiles.
    assert convolution.convolve_cost_s(plan) >= tiled * (1 - 1e-9)


def test_out_of_range_integers_never_reach_tensorflow() -> None:
    x, k = np.ones((4, 4), np.float32), np.ones((2, 2), np.float32)
    for field, options in [
        ("options.strides", types.ConvolutionOptions(strides=(2**31, 1))),
        ("options.dilations", types.ConvolutionOptions(dilations=(1, 2**40))),
        ("options.strides", types.ConvolutionOptions(strides=(-(2**63), 1))),
        (
            "options.explicit_padding",
            types.ConvolutionOptions(padding="EXPLICIT", explicit_padding=(0, 0, 0, 2**31)),
        ),
    ]:
        with pytest.raises(errors.InvalidArgument) as info:
            convolution.convolve(types.ConvolveInput(x, k, None, options))
        assert info.value.field == field
    # The largest int32 stride is accepted: one output per axis.
    big = types.ConvolutionOptions(strides=(2**31 - 1, 2**31 - 1))
    assert convolution.convolve(types.ConvolveInput(x, k, None, big)).output.shape == (1, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"padding": "SAME", "dilations": (2, 1)},
        {"padding": "EXPLICIT", "explicit_padding": (3, 0, 1, 5), "mode": "CONVOLUTION"},
        {"strides": (2, 3), "padding": "SAME"},
    ],
)
def test_fft_route_equals_direct_route(dtype: Any, options: dict[str, Any]) -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(2, 40, 37, 3)).astype(dtype)
    k = rng.uniform(-1, 1, size=(17, 18, 3, 2)).astype(dtype)
    b = rng.uniform(-1, 1, size=2).astype(dtype)
    req = types.ConvolveInput(x, k, b, types.ConvolutionOptions(**options))
    direct = convolution.convolve(req, route="direct").output
    fft = convolution.convolve(req, route="fft").output
    bound = np.abs(direct).max() + 1
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(fft, direct, rtol=0, atol=tol * bound)


def test_auto_route_uses_fft_for_large_kernels_only() -> None:
    shape_x = (1, 64, 64, 1)
    big = convolution.plan_convolution(shape_x, (17, 17, 1, 1), CC)
    assert big.kernel_h * big.kernel_w == convolution.FFT_MIN_KERNEL_ELEMENTS
    assert big.use_fft
    assert not convolution.plan_convolution(shape_x, (16, 17, 1, 1), CC).use_fft
    strided = types.ConvolutionOptions(strides=(2, 2))
    assert not convolution.plan_convolution(shape_x, (17, 17, 1, 1), strided).use_fft
    # The spread kernel would be too large: direct route.
    side = math.isqrt(convolution.FFT_MAX_KERNEL_SPECTRUM // 4) + 1
    assert not convolution.plan_convolution((1, side, side, 2), (17, 17, 2, 2), CC).use_fft
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 1, size=(40, 50))
    k = rng.uniform(-1, 1, size=(17, 17))
    out = convolution.convolve(types.ConvolveInput(x, k)).output
    ref = reference(x[None, :, :, None], k[:, :, None, None])[0, :, :, 0]
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("route", ["direct", "fft"])
def test_batched_call_equals_separate_calls(route: Literal["direct", "fft"]) -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 12, 13, 2)).astype(np.float32)
    k = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    opts = types.ConvolutionOptions(padding="SAME", strides=(1, 2))
    batched = convolution.convolve(types.ConvolveInput(x, k, None, opts), route=route).output
    for i in range(5):
        alone = convolution.convolve(types.ConvolveInput(x[i : i + 1], k, None, opts), route=route)
        np.testing.assert_allclose(batched[i : i + 1], alone.output, rtol=1e-6, atol=1e-6)


def test_runs_on_the_named_device() -> None:
    out = convolution.convolve(
        types.ConvolveInput(np.ones((3, 3), np.float32), np.ones((2, 2), np.float32)),
        device="/CPU:0",
    ).output
    np.testing.assert_array_equal(out, np.full((2, 2), 4.0))


# -- validation --------------------------------------------------------------

F32 = np.float32
X2 = np.ones((5, 5), F32)
K2 = np.ones((2, 2), F32)
X4 = np.ones((1, 5, 5, 2), F32)
K4 = np.ones((2, 2, 2, 3), F32)


def opts(**kwargs: Any) -> types.ConvolutionOptions:
    return types.ConvolutionOptions(**kwargs)


BAD_CONVOLVE = [
    ("input", "rank 2", types.ConvolveInput(np.ones((2, 5, 5), F32), K2)),
    ("input", "float32 or float64", types.ConvolveInput(np.ones((5, 5), np.int32), K2)),
    ("input", "at least 1", types.ConvolveInput(np.ones((0, 5), F32), K2)),
    ("input", "finite", types.ConvolveInput(np.where(np.eye(5) > 0, np.nan, 1).astype(F32), K2)),
    ("input", "finite", types.ConvolveInput(np.full((5, 5), np.inf, F32), K2)),
    ("kernel", "rank 2", types.ConvolveInput(X2, np.ones((2, 2, 1, 1), F32))),
    ("kernel", "rank 4", types.ConvolveInput(X4, K2)),
    ("kernel", "C=2", types.ConvolveInput(X4, np.ones((2, 2, 3, 1), F32))),
    ("kernel", "dtype float32", types.ConvolveInput(X2, np.ones((2, 2)))),
    ("kernel", "finite", types.ConvolveInput(X2, np.array([[1, np.nan]], F32))),
    ("kernel", "padded input", types.ConvolveInput(X2, np.ones((6, 1), F32))),
    ("kernel", "padded input", types.ConvolveInput(X2, K2, None, opts(dilations=(5, 1)))),
    ("bias", "[3]", types.ConvolveInput(X4, K4, np.ones(2, F32))),
    ("bias", "shape [1] expected", types.ConvolveInput(X2, K2, np.ones(2, F32))),
    ("bias", "dtype float32", types.ConvolveInput(X2, K2, np.ones(1))),
    ("bias", "finite", types.ConvolveInput(X2, K2, np.array([np.inf], F32))),
    ("options.strides", "positive", types.ConvolveInput(X2, K2, None, opts(strides=(0, 1)))),
    ("options.strides", "positive", types.ConvolveInput(X2, K2, None, opts(strides=(1, -2)))),
    ("options.strides", "got 3", types.ConvolveInput(X2, K2, None, opts(strides=(1, 1, 1)))),
    ("options.dilations", "positive", types.ConvolveInput(X2, K2, None, opts(dilations=(1, 0)))),
    ("options.dilations", "got 1", types.ConvolveInput(X2, K2, None, opts(dilations=(1,)))),
    ("options.padding", "VALID, SAME", types.ConvolveInput(X2, K2, None, opts(padding="FULL"))),
    ("options.mode", "CONVOLUTION", types.ConvolveInput(X2, K2, None, opts(mode="CONV"))),
    (
        "options.explicit_padding",
        "got none",
        types.ConvolveInput(X2, K2, None, opts(padding="EXPLICIT")),
    ),
    (
        "options.explicit_padding",
        "got 2 values",
        types.ConvolveInput(X2, K2, None, opts(padding="EXPLICIT", explicit_padding=(1, 1))),
    ),
    (
        "options.explicit_padding",
        "non-negative",
        types.ConvolveInput(X2, K2, None, opts(padding="EXPLICIT", explicit_padding=(1, -1, 0, 0))),
    ),
    (
        "options.explicit_padding",
        "EXPLICIT",
        types.ConvolveInput(X2, K2, None, opts(padding="SAME", explicit_padding=(1, 1, 1, 1))),
    ),
]


@pytest.mark.parametrize(
    ("field", "fragment", "req"), BAD_CONVOLVE, ids=[f"{f}-{m}" for f, m, _ in BAD_CONVOLVE]
)
def test_convolve_validation(field: str, fragment: str, req: types.ConvolveInput) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        convolution.validate_convolve(req)
    assert info.value.field == field
    assert fragment in info.value.problem
    assert "expected" in info.value.problem
    with pytest.raises(errors.InvalidArgument):
        convolution.convolve(req)


def test_element_limits_name_the_setting() -> None:
    with pytest.raises(errors.InvalidArgument, match="max_conv_elements") as info:
        convolution.convolve(types.ConvolveInput(X2, K2), max_elements=24)
    assert info.value.field == "input"
    with pytest.raises(errors.InvalidArgument, match="max_kernel_elements") as info:
        convolution.convolve(types.ConvolveInput(X2, K2), max_kernel_elements=3)
    assert info.value.field == "kernel"
    huge_padding = opts(padding="EXPLICIT", explicit_padding=(100, 100, 100, 100))
    with pytest.raises(errors.InvalidArgument, match="max_conv_elements") as info:
        convolution.convolve(types.ConvolveInput(X2, K2, None, huge_padding), max_elements=1000)
    assert info.value.field == "options.explicit_padding"
    # Dilation with stride computes every stride-1 output first: bounded as well.
    dilated = opts(strides=(3, 3), dilations=(2, 2))
    many_filters = types.ConvolveInput(
        np.ones((1, 9, 9, 1), F32), np.ones((2, 2, 1, 4), F32), None, dilated
    )  # output 1x3x3x4 = 36 values, but 1x7x7x4 = 196 at stride 1
    with pytest.raises(errors.InvalidArgument, match="stride-1 output") as info:
        convolution.convolve(many_filters, max_elements=100)
    assert info.value.field == "options.strides"
    assert convolution.convolve(many_filters, max_elements=196).output.shape == (1, 3, 3, 4)
    with pytest.raises(errors.InvalidArgument, match="s of CPU per request") as info:
        convolution.convolve(types.ConvolveInput(X2, K2), max_cpu_s=1e-9)
    assert info.value.field == "input"
    # At the limits exactly: accepted.
    assert convolution.convolve(types.ConvolveInput(X2, K2), max_elements=25, max_kernel_elements=4)


# -- kernel fitting ------------------------------------------------------------


def edge_example(dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    x = EDGE.astype(dtype)
    return x, conv(x, [[1, -1]], dtype=dtype)


def test_fit_recovers_the_reference_kernel_with_defaults() -> None:
    x, y = edge_example()
    result = kernel_fit.fit_kernel(types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2)))
    assert result.kernel.dtype == np.float64
    assert result.kernel.shape == (1, 2)
    np.testing.assert_allclose(result.kernel, [[1, -1]], atol=0.05)
    assert result.bias is None
    assert result.stop_reason == "max_steps"
    assert result.steps == 1000
    assert len(result.loss) == result.steps + 1
    assert result.loss[-1] < 1e-3 * result.loss[0]


def test_fit_is_deterministic_given_the_seed() -> None:
    x, y = edge_example(np.float64)
    req = types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), max_steps=20, seed=7)
    a = kernel_fit.fit_kernel(req)
    b = kernel_fit.fit_kernel(req)
    np.testing.assert_array_equal(a.kernel, b.kernel)
    assert a.loss == b.loss
    other = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), max_steps=20, seed=8)
    )
    assert other.loss[0] != a.loss[0]


def test_fit_loss_is_the_mean_squared_error_before_each_step() -> None:
    x, y = edge_example(np.float64)
    result = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), max_steps=1, seed=3)
    )
    init = np.random.default_rng(3).normal(0, 1 / math.sqrt(2), size=(1, 2))
    expected = np.mean((conv(x, init, dtype=np.float64) - y) ** 2)
    assert result.loss[0] == pytest.approx(expected, rel=1e-12)
    assert len(result.loss) == 2
    assert result.loss[1] < result.loss[0]


def test_fit_stops_when_converged() -> None:
    x, y = edge_example()
    result = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), tolerance=1e-3)
    )
    assert result.stop_reason == "converged"
    assert result.loss[-1] <= 1e-3
    assert all(loss > 1e-3 for loss in result.loss[:-1])
    assert result.steps == len(result.loss) - 1 < 1000


def test_fit_steps_are_capped_by_the_server() -> None:
    x, y = edge_example()
    capped = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), max_steps=500),
        max_steps=12,
    )
    assert capped.steps == 12
    assert capped.stop_reason == "max_steps"
    short = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2), max_steps=4)
    )
    assert short.steps == 4
    assert len(short.loss) == 5


def test_fit_stops_at_the_time_budget() -> None:
    ticks = iter(range(10**6))

    def clock() -> float:
        return float(next(ticks))

    x, y = edge_example()
    result = kernel_fit.fit_kernel(
        types.FitKernelInput(inputs=x, targets=y, kernel_shape=(1, 2)),
        time_budget_s=5.0,
        clock=clock,
    )
    # The clock reads 0 at the start and one more at each check: 1..4 pass, 5 stops.
    assert result.stop_reason == "time_budget"
    assert result.steps == 4
    assert len(result.loss) == 5


def test_fit_multi_channel_with_bias() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 9, 9, 2))
    true_k = rng.normal(size=(2, 2, 2, 3)) * 0.5
    true_b = np.array([0.5, -0.25, 1.0])
    opts_ = types.ConvolutionOptions(padding="SAME", mode="CONVOLUTION")
    y = convolution.convolve(types.ConvolveInput(x, true_k, true_b, opts_)).output
    result = kernel_fit.fit_kernel(
        types.FitKernelInput(
            inputs=x,
            targets=y,
            kernel_shape=(2, 2, 2, 3),
            fit_bias=True,
            options=opts_,
            learning_rate=0.1,
            max_steps=400,
        )
    )
    assert result.bias is not None
    assert result.bias.shape == (3,)
    np.testing.assert_allclose(result.kernel, true_k, atol=0.02)
    np.testing.assert_allclose(result.bias, true_b, atol=0.02)


def test_fit_single_channel_batch() -> None:
    x = EDGE.astype(np.float64)
    xs = np.stack([x, np.roll(x, 1, axis=1)])
    ys = np.stack([conv(xi, [[1, -1]], dtype=np.float64) for xi in xs])
    result = kernel_fit.fit_kernel(types.FitKernelInput(inputs=xs, targets=ys, kernel_shape=(1, 2)))
    np.testing.assert_allclose(result.kernel, [[1, -1]], atol=0.05)


X_FIT, Y_FIT = edge_example()
BAD_FIT = [
    ("inputs", "rank 2", types.FitKernelInput(np.ones(5, F32), Y_FIT, (1, 2))),
    ("inputs", "finite", types.FitKernelInput(np.full((6, 8), np.nan, F32), Y_FIT, (1, 2))),
    ("targets", "dtype float32", types.FitKernelInput(X_FIT, Y_FIT.astype(np.float64), (1, 2))),
    ("targets", "[6, 7]", types.FitKernelInput(X_FIT, np.ones((6, 6), F32), (1, 2))),
    ("targets", "finite", types.FitKernelInput(X_FIT, np.full((6, 7), np.inf, F32), (1, 2))),
    ("kernel_shape", "[kh,kw] or", types.FitKernelInput(X_FIT, Y_FIT, (1, 2, 1))),
    ("kernel_shape", "positive", types.FitKernelInput(X_FIT, Y_FIT, (0, 2))),
    ("kernel_shape", "single-channel", types.FitKernelInput(X_FIT, Y_FIT, (1, 2, 1, 1))),
    (
        "kernel_shape",
        "C=2",
        types.FitKernelInput(np.ones((1, 6, 8, 2), F32), np.ones((1, 6, 7, 1), F32), (1, 2, 1, 1)),
    ),
    (
        "kernel_shape",
        "[kh,kw,C,F]",
        types.FitKernelInput(np.ones((1, 6, 8, 2), F32), np.ones((1, 6, 7, 1), F32), (1, 2)),
    ),
    ("kernel", "padded input", types.FitKernelInput(X_FIT, Y_FIT, (7, 2))),
    ("learning_rate", "positive", types.FitKernelInput(X_FIT, Y_FIT, (1, 2), learning_rate=-1)),
    ("learning_rate", "positive", types.FitKernelInput(X_FIT, Y_FIT, (1, 2), learning_rate=0)),
    ("max_steps", "positive", types.FitKernelInput(X_FIT, Y_FIT, (1, 2), max_steps=-3)),
    ("tolerance", "non-negative", types.FitKernelInput(X_FIT, Y_FIT, (1, 2), tolerance=-1)),
    (
        "options.strides",
        "positive",
        types.FitKernelInput(X_FIT, Y_FIT, (1, 2), options=opts(strides=(0, 1))),
    ),
]


@pytest.mark.parametrize(
    ("field", "fragment", "req"), BAD_FIT, ids=[f"{f}-{m}" for f, m, _ in BAD_FIT]
)
def test_fit_validation(field: str, fragment: str, req: types.FitKernelInput) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        kernel_fit.fit_kernel(req)
    assert info.value.field == field
    assert fragment in info.value.problem
    assert "expected" in info.value.problem


def test_fit_kernel_limit_and_divergence() -> None:
    with pytest.raises(errors.InvalidArgument, match="max_kernel_elements") as info:
        kernel_fit.fit_kernel(types.FitKernelInput(X_FIT, Y_FIT, (1, 2)), max_kernel_elements=1)
    assert info.value.field == "kernel_shape"
    with pytest.raises(errors.InvalidArgument, match="diverged") as info:
        kernel_fit.fit_kernel(types.FitKernelInput(X_FIT, Y_FIT, (1, 2), learning_rate=1e6))
    assert info.value.field == "learning_rate"
