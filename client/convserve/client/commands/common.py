"""What every ``convserve`` command shares: its description, exit codes, flags and client."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from convserve.client.channel import TlsConfig
from convserve.client.errors import InputError
from convserve.client.sync_client import ConvServeClient

EXIT_OK = 0
EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_UNAVAILABLE = 4
EXIT_AUTH = 5

EXIT_CODES_HELP = """\
exit codes:
  0  success (health: the server is SERVING)
  1  any other failure
  2  usage error or unreadable / invalid input file
  3  the server rejected the request (INVALID_ARGUMENT, NOT_FOUND)
  4  the server is unavailable, not serving, or the deadline passed
     (UNAVAILABLE, DEADLINE_EXCEEDED)
  5  authentication failed (UNAUTHENTICATED, PERMISSION_DENIED)

environment: CONVSERVE_TARGET (default --target), CONVSERVE_TOKEN (default --token)
"""

_CODE_TO_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_REJECTED,
    grpc.StatusCode.NOT_FOUND: EXIT_REJECTED,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_AUTH,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_AUTH,
}


def exit_code_for(code: grpc.StatusCode) -> int:
    return _CODE_TO_EXIT.get(code, EXIT_OTHER)


class UsageError(Exception):
    """A flag value that argparse cannot check by itself."""


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """A command with no flags of its own."""


@dataclass(frozen=True)
class Command:
    """One ``convserve`` command.

    `run(args)` does it and returns the exit code; it may raise UsageError,
    InputError, ConvServeError, SetupError or ImportError, which the command
    line turns into a message and an exit code. `add_arguments(parser)` adds
    the command's own flags (the connection flags and --json come with every
    command). `help` is the one line shown in ``convserve --help`` and atop
    the command's own help; `examples`, when given, are shown before the
    exit codes at its end.
    """

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments
    examples: str = ""


# --- Flags ------------------------------------------------------------------------------


def ints(text: str, count: int | tuple[int, ...], name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{name}: expected comma-separated integers, got {text!r}") from None
    counts = (count,) if isinstance(count, int) else count
    if len(values) not in counts:
        raise UsageError(f"{name}: expected {' or '.join(map(str, counts))} values, got {text!r}")
    return values


def add_version_options(parser: argparse.ArgumentParser) -> None:
    """--model-version and --version-label: a version other than the serving one."""
    pin = parser.add_mutually_exclusive_group()
    pin.add_argument("--model-version", type=int, help="pin a loaded model version")
    pin.add_argument(
        "--version-label",
        help="pin the version a label of the server's model config file names (e.g. canary)",
    )


def version_pin(args: argparse.Namespace) -> dict[str, Any]:
    """The version a command names: --model-version or --version-label (argparse allows
    one of the two)."""
    return {"model_version": args.model_version, "version_label": args.version_label}


def load_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a numpy .npy file ({exc})") from exc


# --- The connection ---------------------------------------------------------------------


def read_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"{args.token_file}: cannot read token ({exc.strerror})") from None
    return args.token or None


def tls_config(args: argparse.Namespace) -> TlsConfig | None:
    """The TLS settings the --tls* flags ask for; None for plaintext."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key must be given together")
    wanted = args.tls or args.tls_ca or args.tls_cert or args.tls_server_name
    if not wanted:
        return None
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    return TlsConfig(
        root_ca=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        server_name_override=args.tls_server_name,
    )


def connect(args: argparse.Namespace, **kwargs: Any) -> ConvServeClient:
    """A client for the connection flags (and --model) of `args`."""
    return ConvServeClient(
        args.target,
        timeout_s=args.timeout_s,
        tls=tls_config(args) or False,
        token=read_token(args),
        retries=args.retries,
        model_name=args.model,
        **kwargs,
    )


# --- Output -----------------------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def matrix_text(array: np.ndarray) -> str:
    return np.array2string(array, precision=4, suppress_small=True, max_line_width=100)
