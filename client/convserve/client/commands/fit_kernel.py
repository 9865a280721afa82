"""``convserve fit-kernel``: learn a kernel from input and target arrays."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from convserve.client.commands.common import (
    EXIT_OK,
    Command,
    connect,
    emit,
    ints,
    load_npy,
    matrix_text,
)
from convserve.client.commands.convolve import add_convolution_options, convolution_kwargs
from convserve.client.table import format_table


def _loss_points(steps: int) -> list[int]:
    """About ten indexes into the loss curve, denser at the start where it falls fastest."""
    if steps <= 10:
        return list(range(steps + 1))
    points = {0, steps}
    points.update(round(float(v)) for v in np.geomspace(1, steps, 9))
    return sorted(points)


def run(args: argparse.Namespace) -> int:
    inputs = load_npy(Path(args.inputs))
    targets = load_npy(Path(args.targets))
    kernel_shape = ints(args.kernel_shape, (2, 4), "--kernel-shape")
    with connect(args) as client:
        fit = client.fit_kernel(
            inputs,
            targets,
            kernel_shape,
            fit_bias=args.fit_bias,
            learning_rate=args.learning_rate,
            max_steps=args.steps,
            tolerance=args.tolerance,
            seed=args.seed,
            **convolution_kwargs(args),
        )
    loss = list(fit.loss)
    data = {
        "kernel": fit.kernel.tolist(),
        "bias": fit.bias.tolist() if fit.bias is not None else None,
        "steps": fit.steps,
        "stop_reason": fit.stop_reason,
        "loss": loss,
    }
    lines = [f"kernel {list(fit.kernel.shape)}:", matrix_text(fit.kernel)]
    if fit.bias is not None:
        lines.append(f"bias: {matrix_text(fit.bias)}")
    lines.append(f"steps: {fit.steps} ({fit.stop_reason})")
    if loss:
        lines.append(f"loss: {loss[0]:.6g} -> {loss[-1]:.6g}")
        rows = [[i, f"{loss[i]:.6g}"] for i in _loss_points(len(loss) - 1)]
        lines.append(format_table(["step", "loss"], rows, right=(0, 1)))
    emit(args, data, "\n".join(lines))
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inputs", required=True, help=".npy: [H,W], [N,H,W] or [N,H,W,C]")
    parser.add_argument("--targets", required=True, help=".npy: the matching outputs")
    parser.add_argument("--kernel-shape", required=True, help="KH,KW or KH,KW,C,F")
    parser.add_argument("--fit-bias", action="store_true", help="also learn a bias")
    parser.add_argument("--steps", type=int, help="maximum steps (default: the server's)")
    parser.add_argument("--learning-rate", type=float, help="step size (default: the server's)")
    parser.add_argument("--tolerance", type=float, default=0.0, help="stop at this loss")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial kernel")
    add_convolution_options(parser)


COMMAND = Command("fit-kernel", "learn a kernel from input/target arrays", run, add_arguments)
