"""``convserve health``: the server's gRPC health status, now or once it is SERVING."""

from __future__ import annotations

import argparse

from convserve.client.commands.common import EXIT_OK, EXIT_UNAVAILABLE, Command, connect, emit


def run(args: argparse.Namespace) -> int:
    with connect(args) as client:
        if args.wait_s > 0:
            status = client.wait_for_serving(args.wait_s, service=args.service)
        else:
            status = client.health(args.service)
    emit(args, {"target": args.target, "service": args.service, "status": status}, status)
    return EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-s", type=float, default=0.0, help="poll up to this long for SERVING (default 0)"
    )
    parser.add_argument("--service", default="", help="service name to check (default: the server)")


COMMAND = Command("health", "check the server's health (exit 0 when SERVING)", run, add_arguments)
