"""Kernel fitting by gradient descent, run with TensorFlow.

A fit learns the kernel (and optionally a bias per filter) of a convolution
that maps inputs to targets, with the semantics, padding and dtypes described
in `convolution`; its gradient steps run that module's direct route.

Cost: one gradient step is estimated by `costs.CALIBRATED` and may cost at most
``max_step_s`` CPU seconds, and a `check` callback runs between the steps, so a
caller that has gone or whose deadline has passed stops costing CPU within
about one step.
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

from convserve.server import convolution, costs, errors, types

# Estimated CPU seconds one gradient step of a fit may cost: a fit checks for
# cancellation between steps, so this bounds how long it runs on after its caller left.
FIT_MAX_STEP_S = 0.1


@dataclass(frozen=True)
class FitPlan:
    """A checked FitKernel request: its geometry, data and limits."""

    plan: convolution.ConvPlan
    x4: np.ndarray
    y4: np.ndarray
    kernel_shape: tuple[int, ...]
    learning_rate: float
    max_steps: int
    step_s: float  # estimated CPU seconds of one gradient step

    def cost_s(self, time_budget_s: float) -> float:
        """Estimated CPU seconds of the whole fit: it stops after max_steps steps, or at
        the first check after `time_budget_s`, one step later at most."""
        return min((self.max_steps + 1) * self.step_s, time_budget_s + self.step_s)


def validate_fit(
    req: types.FitKernelInput,
    *,
    default_learning_rate: float = 0.03,
    max_steps: int = 1000,
    max_elements: int = convolution.DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = convolution.DEFAULT_MAX_KERNEL_ELEMENTS,
    max_step_s: float = FIT_MAX_STEP_S,
) -> FitPlan:
    """Run every check `fit_kernel` runs, without computing; returns the plan.

    Raises errors.InvalidArgument naming the offending field, also when one
    gradient step is estimated above `max_step_s`.
    """
    x = convolution.check_array("inputs", req.inputs, "[H,W], [N,H,W] or [N,H,W,C]")
    if x.ndim not in (2, 3, 4):
        raise errors.InvalidArgument(
            "inputs",
            f"rank 2 [H,W], 3 [N,H,W] or 4 [N,H,W,C] expected, got shape {list(x.shape)}",
        )
    convolution.check_size("inputs", x, max_elements, "max_conv_elements")
    y = convolution.check_array("targets", req.targets, "matching the inputs")
    if y.dtype != x.dtype:
        raise errors.InvalidArgument(
            "targets", f"dtype {x.dtype} (the inputs' dtype) expected, got {y.dtype}"
        )
    convolution.check_size("targets", y, max_elements, "max_conv_elements")
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
    plan = convolution.plan_convolution(x4.shape, k_shape4, req.options)
    plan = dataclasses.replace(plan, two_d=False, float64=x.dtype == np.float64)
    convolution.check_geometry_limits(plan, max_elements)
    step_s = costs.CALIBRATED.fit_step_s(plan)
    if step_s > max_step_s:
        # A fit checks for cancellation between steps: one step is its unit of work.
        raise errors.InvalidArgument(
            "inputs",
            f"inputs, targets and kernel whose gradient step costs at most {max_step_s:g} s "
            f"of CPU expected, one step needs about {step_s:.3g} s; use fewer or smaller "
            "inputs or a smaller kernel",
        )
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
    convolution.check_finite("inputs", x)
    convolution.check_finite("targets", y)
    return FitPlan(plan, x4, y4, shape, lr, steps, step_s)


def _mse_and_step(
    x: tf.Tensor,
    y: tf.Tensor,
    k: tf.Tensor,
    b: tf.Tensor,
    lr: tf.Tensor,
    plan: convolution.ConvPlan,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The loss at (k, b) and the parameters after one plain SGD step."""
    with tf.GradientTape() as tape:
        tape.watch([k, b])
        loss = tf.reduce_mean(tf.square(convolution.direct(x, k, plan) + b - y))
    grad_k, grad_b = tape.gradient(loss, [k, b])
    return loss, k - lr * grad_k, b - lr * grad_b


@functools.lru_cache(maxsize=64)
def _sgd_step(plan: convolution.ConvPlan) -> Callable[..., Any]:
    """One traced SGD step per geometry, reused by later fits with the same geometry."""
    return tf.function(functools.partial(_mse_and_step, plan=plan))


def fit_kernel(
    req: types.FitKernelInput,
    *,
    device: str = "/CPU:0",
    default_learning_rate: float = 0.03,
    max_steps: int = 1000,
    time_budget_s: float = 10.0,
    max_elements: int = convolution.DEFAULT_MAX_ELEMENTS,
    max_kernel_elements: int = convolution.DEFAULT_MAX_KERNEL_ELEMENTS,
    max_step_s: float = FIT_MAX_STEP_S,
    clock: Callable[[], float] = time.monotonic,
    check: convolution.Check | None = None,
) -> types.FitKernelOutput:
    """Learn a kernel (and optionally a bias per filter) mapping inputs to targets.

    Gradient descent on the mean squared error with plain SGD
    (``w -= lr * grad``), starting from a normal kernel drawn with `req.seed`
    (std ``1/sqrt(kh*kw*C)``) and a zero bias. Stops when the loss is at or
    below `req.tolerance` ("converged"), after the request's max_steps capped
    by `max_steps` ("max_steps"), or when `time_budget_s` has passed on
    `clock` ("time_budget"). `loss` holds the loss before each step, then
    after the last. Computes in the inputs' dtype; returns float64.
    Raises errors.InvalidArgument for bad fields, a step estimated above
    `max_step_s`, or when the loss diverges; `check` runs before every step
    and stops the fit by raising.
    """
    fit = validate_fit(
        req,
        default_learning_rate=default_learning_rate,
        max_steps=max_steps,
        max_elements=max_elements,
        max_kernel_elements=max_kernel_elements,
        max_step_s=max_step_s,
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
            if check is not None:
                check()
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
