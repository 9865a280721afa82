"""What a convolution or a kernel fit costs, in CPU seconds, before it runs.

The server admits a request only when its estimate is within
``max_request_cpu_s``, splits long work into units of about `UNIT_S` that
check for cancellation between them, and stops work that runs far past its
estimate. The estimates are linear in a few features of the geometry per
route, with coefficients measured on this kind of machine by
``tests/bench_costs.py`` (which prints each grid point's measured time next
to the estimate), times a safety factor so that they err on the high side.

Multiply-adds alone do not predict the direct route: TensorFlow's float32
kernels reach several G multiply-adds per CPU second on many channels and far
fewer on one, its float64 kernels are about ten times slower, so the direct
model charges a multiply-add more when the channels x filters product is
small, and has its own coefficients for float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from convserve.server.convolution import ConvPlan

# Seconds of work per unit: long work is split into units of about this size, and
# checks between units whether its caller is still waiting.
UNIT_S = 0.05
# Work that runs longer than this many times its estimate (and at least MIN_OVERRUN_S
# longer) is stopped: the estimate was wrong, and the request must not hold the server.
OVERRUN_FACTOR = 4.0
MIN_OVERRUN_S = 1.0


def direct_features(plan: ConvPlan) -> tuple[float, ...]:
    """(calls, output values, padded input values, multiply-adds, multiply-adds per
    channel-filter pair) of the direct route."""
    macs = float(plan.direct_work())
    out_h, out_w = plan.stride_one_output() if plan.subsampled else (plan.out_h, plan.out_w)
    hp, wp = plan.padded
    return (
        1.0,
        float(plan.n * out_h * out_w * plan.filters),
        float(plan.n * hp * wp * plan.channels),
        macs,
        macs / (plan.channels * plan.filters),
    )


def fft_features(plan: ConvPlan) -> tuple[float, ...]:
    """(calls, products of spectra, transformed values x log2 size, padded input
    values) of the FFT route."""
    hp, wp = plan.padded
    size = hp * wp
    log = max(1, math.ceil(math.log2(size)))
    n, c, f = plan.n, plan.channels, plan.filters
    return (
        1.0,
        float(n * c * f * size),
        float((n * c + c * f + n * f) * size * log),
        float(n * size * c),
    )


@dataclass(frozen=True)
class CostModel:
    """Linear CPU-second estimates per route; see `direct_features` and `fft_features`."""

    direct: tuple[float, ...]
    fft: tuple[float, ...]
    # A gradient step: fit_step[0] + fit_step[1] * (the direct route's forward estimate).
    fit_step: tuple[float, float]
    # The same in float64, which TensorFlow computes by other kernels (about ten times
    # slower on the direct route).
    direct64: tuple[float, ...]
    fft64: tuple[float, ...]
    safety: float = 1.0

    def direct_s(self, plan: ConvPlan) -> float:
        coefficients = self.direct64 if plan.float64 else self.direct
        features = direct_features(plan)
        return self.safety * sum(c * x for c, x in zip(coefficients, features, strict=True))

    def fft_s(self, plan: ConvPlan) -> float:
        coefficients = self.fft64 if plan.float64 else self.fft
        features = fft_features(plan)
        return self.safety * sum(c * x for c, x in zip(coefficients, features, strict=True))

    def convolve_s(self, plan: ConvPlan, *, fft: bool) -> float:
        return self.fft_s(plan) if fft else self.direct_s(plan)

    def fit_step_s(self, plan: ConvPlan) -> float:
        base, factor = self.fit_step
        return self.safety * base + factor * self.direct_s(plan)


# Fitted by tests/bench_costs.py on a 2-core x86-64 machine without a GPU
# (TensorFlow 2.21; 218 geometries, float32 and float64, 0.1 ms to 0.5 s of CPU
# each); the safety factor is 1.1 times the largest measured/fitted ratio of
# the geometries of 10 ms or more, so on that grid the estimate was never below
# the measured CPU time (measured/estimated: 0.05 to 0.99).
CALIBRATED = CostModel(
    direct=(2.5e-4, 4.1e-10, 2.2e-9, 8.7e-12, 1.7e-10),
    fft=(1.5e-3, 0.0, 5.7e-10, 0.0),
    fit_step=(1.6e-4, 1.12),
    direct64=(1.8e-4, 3.0e-9, 5.1e-9, 3.8e-11, 1.6e-9),
    fft64=(1.3e-3, 0.0, 8.6e-10, 0.0),
    safety=2.52,
)
