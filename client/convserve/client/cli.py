"""The ``convserve`` command line: talk to a convserve server and load-test it.

Each command is a module of `convserve.client.commands` that ends with a
`Command` (see `convserve.client.commands.common`): its name, its one-line
help, a function that adds its own flags to its parser, and a function that
runs it and returns the exit code. To add a command:

1. Write ``commands/NAME.py`` with ``run(args) -> int``, ``add_arguments(parser)``
   and ``COMMAND = Command("NAME", "what it does", run, add_arguments)``.
   Connect with ``common.connect(args)``, print with ``common.emit(args, data,
   text)``, and raise UsageError / InputError for bad flags or files: `main`
   turns every error into a message and an exit code (see ``EXIT_CODES_HELP``).
2. Add ``NAME.COMMAND`` to `COMMANDS` below, where it should appear in
   ``convserve --help``.

Every command takes the connection flags and --json, before or after its name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from convserve.client.bench_config import SetupError
from convserve.client.commands import (
    bench,
    convolve,
    feature_maps,
    fit_kernel,
    health,
    metadata,
    models,
    predict,
)
from convserve.client.commands.common import (
    EXIT_CODES_HELP,
    EXIT_OTHER,
    EXIT_USAGE,
    Command,
    UsageError,
    exit_code_for,
)
from convserve.client.config import DEFAULT_TARGET
from convserve.client.errors import ConvServeError, InputError

# The commands, in the order ``convserve --help`` lists them.
COMMANDS: list[Command] = [
    predict.COMMAND,
    convolve.COMMAND,
    fit_kernel.COMMAND,
    feature_maps.COMMAND,
    metadata.COMMAND,
    models.COMMAND,
    health.COMMAND,
    bench.COMMAND,
]


class _TargetAction(argparse.Action):
    """Stores --target and records every value given, before and after the command, in
    a list both parsers share: argparse keeps only the last, and bench refuses two."""

    def __init__(self, option_strings: Sequence[str], dest: str, given: list[str], **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.given = given

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        self.given.append(values)
        setattr(namespace, self.dest, values)


def _common_options(
    *, with_defaults: bool, targets_given: list[str] | None = None
) -> argparse.ArgumentParser:
    """The connection flags and --json, accepted before and after the command.

    The top-level parser holds the defaults; a command's parser leaves a flag
    unset unless it is given there (argparse.SUPPRESS), so that
    ``convserve --json bench`` and ``convserve bench --json`` mean the same and
    a flag after the command wins over the same flag before it.
    """

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--target",
        action=_TargetAction,
        given=[] if targets_given is None else targets_given,
        default=default(os.environ.get("CONVSERVE_TARGET", DEFAULT_TARGET)),
        help="host:port, or dns:///name:port to balance over every address "
        f"(default: $CONVSERVE_TARGET or {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="use TLS (implied by the --tls-* flags)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=default(None),
        help="CA certificate(s) to verify the server",
    )
    group.add_argument(
        "--tls-cert", metavar="PEM", default=default(None), help="client certificate (mutual TLS)"
    )
    group.add_argument(
        "--tls-key", metavar="PEM", default=default(None), help="client private key (mutual TLS)"
    )
    group.add_argument(
        "--tls-server-name", metavar="NAME", default=default(None), help="expected server name"
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        default=default(os.environ.get("CONVSERVE_TOKEN")),
        help="bearer token (default: $CONVSERVE_TOKEN)",
    )
    tokens.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(None),
        help="read the bearer token from FILE",
    )
    group.add_argument(
        "--timeout-s",
        type=float,
        default=default(30.0),
        help="deadline per command (default 30)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=default(3),
        help="retries on UNAVAILABLE and RESOURCE_EXHAUSTED (default 3)",
    )
    group.add_argument(
        "--model",
        metavar="NAME",
        default=default(""),
        help="the model to call (default: the server's default model; see 'convserve models'); "
        "bench with another protocol than convserve needs it: the model's name there",
    )
    common.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON instead of a table"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    targets_given: list[str] = []
    common = _common_options(with_defaults=False, targets_given=targets_given)
    parser = argparse.ArgumentParser(
        prog="convserve",
        parents=[_common_options(with_defaults=True, targets_given=targets_given)],
        description="Image classification and 2-D convolution on a convserve server, "
        "and load tests.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(targets_given=targets_given)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        epilog = f"{command.examples}\n{EXIT_CODES_HELP}" if command.examples else EXIT_CODES_HELP
        p = sub.add_parser(
            command.name,
            parents=[common],
            help=command.help,
            description=command.help,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=command.run)
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    as_json = bool(getattr(args, "json", False))

    def fail(code: int, message: str, status: str | None = None) -> int:
        print(f"convserve {args.command}: error: {message}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": {"code": status, "message": message}, "exit_code": code}))
        return code

    try:
        return int(args.handler(args))
    except UsageError as exc:
        return fail(EXIT_USAGE, str(exc))
    except InputError as exc:
        return fail(EXIT_USAGE, str(exc))
    except ConvServeError as exc:
        return fail(exit_code_for(exc.code), f"{exc.code.name}: {exc.details}", exc.code.name)
    except SetupError as exc:
        return fail(EXIT_OTHER, str(exc))
    except ImportError as exc:
        return fail(EXIT_OTHER, str(exc))
    except ValueError as exc:  # e.g. unreadable TLS files found while building credentials
        return fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return 130
