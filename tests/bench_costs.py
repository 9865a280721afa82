"""Calibrate the cost model of `convserve.server.costs` on this machine.

Measures the CPU seconds (all threads of this process, `time.process_time`)
that `convolution.convolve` takes by each route, and a FitKernel gradient step, on a
grid of geometries; fits each route's coefficients by non-negative least
squares on relative error; and prints the fitted model, then every grid
point's measured time next to the estimates of both the fitted and the
current (`costs.CALIBRATED`) model. The constants in `costs.CALIBRATED` come
from a run of this script; rerun it on another kind of machine and paste its
output there.

    python tests/bench_costs.py [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time
from collections.abc import Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The least process CPU time of `repeats` calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn()
        best = min(best, time.process_time() - started)
    return best


def _direct_grid(
    quick: bool,
) -> list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], tuple[int, int]]]:
    """(input shape, kernel shape, strides, dilations) of the direct route's grid."""
    grid = []
    sizes = (64, 256) if quick else (64, 256, 768)
    for size, k, stride, dilation in itertools.product(sizes, (3, 7, 15), (1, 2), (1, 2)):
        grid.append(((1, size, size, 1), (k, k, 1, 1), (stride, stride), (dilation, dilation)))
    channels = (1, 8) if quick else (1, 8, 32)
    for n, size, c, f, k in itertools.product((1, 4), (32, 128), channels, channels, (3, 5)):
        grid.append(((n, size, size, c), (k, k, c, f), (1, 1), (1, 1)))
    # Large kernels reach the direct route only with a stride (stride 1 goes to the FFT
    # route), and run there far below the multiply-add rate of small ones.
    large = ((512, 31), (512, 63)) if quick else ((512, 31), (512, 63), (1024, 31))
    for (size, k), dilation in itertools.product(large, (1, 2)):
        grid.append(((1, size, size, 1), (k, k, 1, 1), (2, 2), (dilation, dilation)))
    # A wide layer, as in a CNN.
    grid.append(((1, 128, 128, 64), (3, 3, 64, 64), (1, 1), (1, 1)))
    return grid


def _fft_grid(quick: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    grid = []
    sizes = (64, 256) if quick else (64, 256, 1024, 2048)
    for size, k in itertools.product(sizes, (17, 33, 65)):
        if k < size:
            grid.append(((1, size, size, 1), (k, k, 1, 1)))
    for n, c, f in itertools.product((1, 4), (1, 4), (1, 4)):
        grid.append(((n, 128, 128, c), (17, 17, c, f)))
    return grid


def _fit_grid(quick: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    grid = []
    for n, size, k in itertools.product((1, 8), (32, 128) if quick else (32, 128, 256), (3, 7)):
        grid.append(((n, size, size, 1), (k, k, 1, 1)))
    for c, f in ((4, 4), (8, 8)):
        grid.append(((4, 64, 64, c), (3, 3, c, f)))
    return grid


def _nnls_relative(features: np.ndarray, seconds: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the squared relative error."""
    from scipy.optimize import nnls

    weights = 1.0 / seconds
    coefficients, _ = nnls(features * weights[:, None], seconds * weights)
    return coefficients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per point (best)")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from convserve.server import convolution, costs, kernel_fit, types

    rng = np.random.default_rng(0)

    def convolve_case(shape, kshape, strides, dilations, route, dtype=np.float32):
        x = rng.standard_normal(shape).astype(dtype)
        k = rng.standard_normal(kshape).astype(dtype)
        options = types.ConvolutionOptions(strides=strides, dilations=dilations)
        value = types.ConvolveInput(x, k, None, options)
        plan = convolution.validate_convolve(value, max_cpu_s=1e9)
        seconds = _cpu_seconds(
            lambda: convolution.convolve(value, max_cpu_s=1e9, route=route, unit_s=1e9),
            args.repeats,
        )
        return plan, seconds

    direct, fft, fit = [], [], []
    grid = _direct_grid(args.quick)
    for i, (shape, kshape, strides, dilations) in enumerate(grid):
        plan, seconds = convolve_case(shape, kshape, strides, dilations, "direct")
        direct.append((plan, seconds))
        print(f"\rdirect {i + 1}/{len(grid)}", end="", file=sys.stderr, flush=True)
    grid_f = _fft_grid(args.quick)
    for i, (shape, kshape) in enumerate(grid_f):
        plan, seconds = convolve_case(shape, kshape, (1, 1), (1, 1), "fft")
        fft.append((plan, seconds))
        print(f"\rfft {i + 1}/{len(grid_f)}   ", end="", file=sys.stderr, flush=True)
    # float64 on every few points of each route: measured against float32 at the same point.
    f64_direct, f64_fft = [], []
    for points, grid_of, out in ((direct, grid, f64_direct), (fft, grid_f, f64_fft)):
        route = "direct" if points is direct else "fft"
        for (_plan32, seconds32), case in list(zip(points, grid_of, strict=True))[::2]:
            shape, kshape = case[0], case[1]
            strides, dilations = (case[2], case[3]) if route == "direct" else ((1, 1), (1, 1))
            plan, seconds = convolve_case(shape, kshape, strides, dilations, route, np.float64)
            out.append((plan, seconds, seconds32))
        print(f"\r{route} float64 done   ", end="", file=sys.stderr, flush=True)
    grid_s = _fit_grid(args.quick)
    for i, (shape, kshape) in enumerate(grid_s):
        x = rng.standard_normal(shape, dtype=np.float32)
        plan = convolution.plan_convolution(shape, kshape, types.ConvolutionOptions())
        y = rng.standard_normal(plan.output_shape, dtype=np.float32)
        steps = 5
        value = types.FitKernelInput(x, y, kshape, max_steps=steps)

        def run(value=value, steps=steps):
            return kernel_fit.fit_kernel(value, max_steps=steps, max_step_s=1e9)

        fit.append((plan, _cpu_seconds(run, args.repeats) / (steps + 1)))
        print(f"\rfit {i + 1}/{len(grid_s)}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    current = costs.CALIBRATED
    d_features = np.array([costs.direct_features(p) for p, _ in direct], dtype=np.float64)
    d_coef = _nnls_relative(d_features, np.array([s for _, s in direct]))
    f_features = np.array([costs.fft_features(p) for p, _ in fft], dtype=np.float64)
    f_coef = _nnls_relative(f_features, np.array([s for _, s in fft]))
    fitted = dataclasses.replace(
        current, direct=tuple(float(c) for c in d_coef), fft=tuple(float(c) for c in f_coef)
    )
    s_features = np.array([[fitted.direct_s(p)] for p, _ in fit])
    s_coef = _nnls_relative(
        np.hstack([np.ones((len(fit), 1)), s_features]), np.array([s for _, s in fit])
    )
    fitted = dataclasses.replace(fitted, fit_step=(float(s_coef[0]), float(s_coef[1])))

    d64 = _nnls_relative(
        np.array([costs.direct_features(p) for p, _, _ in f64_direct], dtype=np.float64),
        np.array([s for _, s, _ in f64_direct]),
    )
    f64 = _nnls_relative(
        np.array([costs.fft_features(p) for p, _, _ in f64_fft], dtype=np.float64),
        np.array([s for _, s, _ in f64_fft]),
    )
    fitted = dataclasses.replace(
        fitted, direct64=tuple(float(c) for c in d64), fft64=tuple(float(c) for c in f64)
    )
    # The safety factor covers the largest measured/estimated ratio among points of at
    # least 10 ms (below that the fixed per-call cost and timer noise dominate).
    raw = dataclasses.replace(fitted, safety=1.0)
    ratios = [s / raw.direct_s(p) for p, s in direct if s >= 0.01]
    ratios += [s / raw.fft_s(p) for p, s in fft if s >= 0.01]
    ratios += [s / raw.direct_s(p) for p, s, _ in f64_direct if s >= 0.01]
    ratios += [s / raw.fft_s(p) for p, s, _ in f64_fft if s >= 0.01]
    fitted = dataclasses.replace(fitted, safety=round(1.1 * max([*ratios, 1.0]), 2))

    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs")
    print(f"fitted: {fitted!r}")
    print()
    print("| route | geometry | measured CPU s | fitted | ratio | current | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    worst = {"fitted": 0.0, "current": 0.0}
    for route, points, estimate in (
        ("direct", direct, lambda m, p: m.direct_s(p)),
        ("fft", fft, lambda m, p: m.fft_s(p)),
        ("direct f64", [(p, s) for p, s, _ in f64_direct], lambda m, p: m.direct_s(p)),
        ("fft f64", [(p, s) for p, s, _ in f64_fft], lambda m, p: m.fft_s(p)),
        ("fit step", fit, lambda m, p: m.fit_step_s(p)),
    ):
        for plan, seconds in points:
            a, b = estimate(fitted, plan), estimate(current, plan)
            worst["fitted"] = max(worst["fitted"], seconds / a)
            worst["current"] = max(worst["current"], seconds / b)
            geometry = (
                f"{plan.n}x{plan.height}x{plan.width}x{plan.channels} "
                f"k{plan.kernel_h}x{plan.kernel_w}x{plan.filters} s{plan.strides[0]} "
                f"d{plan.dilations[0]}"
            )
            print(
                f"| {route} | {geometry} | {seconds:.4f} | {a:.4f} | {seconds / a:.2f} "
                f"| {b:.4f} | {seconds / b:.2f} |"
            )
    print()
    print(
        f"largest measured/estimated: fitted {worst['fitted']:.2f}, "
        f"current {worst['current']:.2f} (current includes its safety factor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
