"""``convserve models``: the server's models, their versions and which one serves."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from convserve.client.commands.common import EXIT_OK, Command, connect, emit
from convserve.client.table import format_table


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count else "-"


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        listing = client.list_models()
    rows = []
    for model in listing:
        serving = model.serving_version
        rows.append(
            [
                model.name,
                "yes" if model.ready else "no",
                "-" if serving is None else serving,
                ", ".join(f"{v.version} {v.state}" for v in model.versions) or "-",
                " ".join(f"{label}={version}" for label, version in model.labels) or "-",
                _mib(model.memory_bytes),
                "; ".join(
                    ([model.error] if model.error else [])
                    + [f"{v.version}: {v.error}" for v in model.versions if v.error]
                    + list(model.label_errors)
                )
                or "-",
            ]
        )
    text = format_table(
        ["model", "ready", "serving", "versions", "labels", "memory", "errors"],
        rows,
        right=(2, 5),
    )
    text += f"\ndefault model: {listing.default_model or '-'}"
    data = {
        "default_model": listing.default_model,
        "models": [
            {
                "name": model.name,
                "ready": model.ready,
                "serving_version": model.serving_version,
                "error": model.error,
                "memory_bytes": model.memory_bytes,
                "versions": [asdict(v) for v in model.versions],
                "labels": dict(model.labels),
                "label_errors": list(model.label_errors),
            }
            for model in listing
        ],
    }
    emit(args, data, text)
    return EXIT_OK


COMMAND = Command("models", "list the server's models, their versions and which one serves", run)
