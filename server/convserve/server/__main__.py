"""``convserve-server``: run the server until SIGTERM or SIGINT.

Exit codes: 0 after a graceful stop (also when SIGTERM comes during start-up);
2 for unusable settings, a port that cannot be bound or, with
--exit-on-load-error, a model without a loadable version (the reason is
printed to stderr and logged); 1 for anything unexpected; 3 when the stop took
longer than the grace period plus `STOP_MARGIN_S` (work that would not stop was
abandoned, and the process exited anyway).

Stopping never waits for stuck work beyond that bound: model workers that
hang are killed, operations are stopped between their units of work, and
threads still computing after the stop are abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

# The rest of the server is imported in the functions below, after `main` has taken
# SIGTERM over: those imports take a second or more, and a signal meanwhile must still
# be a clean stop.
if TYPE_CHECKING:
    from convserve.server.settings import Settings

log = logging.getLogger("convserve.server")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STUCK = 3
# Seconds past the grace period a stop may take before the process exits regardless.
STOP_MARGIN_S = 5.0


def _fail(message: str) -> int:
    print(f"convserve-server: {message}", file=sys.stderr)
    return EXIT_USAGE


async def serve(settings: Settings) -> int:
    """Start, serve until SIGTERM/SIGINT, stop within grace_period_s; returns the exit code."""
    from convserve.server import errors
    from convserve.server.app import start_server
    from convserve.server.listen import StartupError
    from convserve.server.settings import SettingsError

    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        starting = asyncio.create_task(start_server(settings))
        stopping = asyncio.create_task(stop_requested.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            # Stopped while loading the model: nothing was accepted yet, so nothing to drain.
            log.info("stop requested during start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            return EXIT_OK
        try:
            running = starting.result()
        except (StartupError, SettingsError, errors.ServeError) as exc:
            log.error("cannot start: %s", exc)
            stopping.cancel()
            return _fail(f"cannot start: {exc}")
        if not logging.getLogger("convserve.server.app").isEnabledFor(logging.INFO):
            # The chosen ports are always reported, whatever the log level.
            print(running.listening_line, file=sys.stderr, flush=True)
        await stopping
        log.info("stop requested (signal); grace period %.1f s", settings.grace_period_s)
        try:
            await asyncio.wait_for(
                running.stop(settings.grace_period_s), settings.grace_period_s + STOP_MARGIN_S
            )
        except TimeoutError:
            log.error(
                "the stop took over %.1f s; exiting anyway",
                settings.grace_period_s + STOP_MARGIN_S,
            )
            return EXIT_STUCK
        return EXIT_OK if running.stopped_cleanly else EXIT_STUCK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
            # A second signal while the process winds down changes nothing; without a
            # handler it would end the process with -15 instead of its exit code.
            signal.signal(sig, _ignore_signal)


class _StopBeforeServing(BaseException):
    """SIGTERM/SIGINT before the event loop took the signals over."""


def _stop_before_serving(signum: int, frame: object) -> None:
    raise _StopBeforeServing


def _ignore_signal(signum: int, frame: object) -> None:
    """The stop is already under way."""


def main(argv: Sequence[str] | None = None) -> int:
    # Until `serve` installs the loop's handlers (imports and settings take seconds), a
    # SIGTERM would kill the process with -15: stopping before serving is a clean stop.
    previous = {
        sig: signal.signal(sig, _stop_before_serving) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        code = _main(argv)
    except _StopBeforeServing:
        code = EXIT_OK
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    from convserve.server import blocking

    if code == EXIT_STUCK or blocking.pending():
        # Python joins every non-daemon thread at exit, and finalizing the interpreter
        # under a thread still inside TensorFlow or a blocked file read can crash or
        # hang: a thread one of those still holds is abandoned with the process.
        if blocking.pending():
            log.warning("%d blocked file system call(s) abandoned at exit", blocking.pending())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def configure_logging(log_format: str, level: str) -> None:
    """`logs.configure_logging`, imported only once `main` runs."""
    from convserve.server import logs

    logs.configure_logging(log_format, level)


def _main(argv: Sequence[str] | None) -> int:
    from convserve.server.settings import Settings, SettingsError

    try:
        settings = Settings.from_argv(argv)
    except SettingsError as exc:
        return _fail(str(exc))
    except SystemExit as exc:  # argparse: --help (0) or a malformed command line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configure_logging(settings.log_format, settings.log_level)
    try:
        settings.read_auth_token()
    except SettingsError as exc:
        return _fail(str(exc))
    # Process-wide, so it is set here and not by servers started in-process (tests).
    sys.setswitchinterval(settings.switch_interval_us / 1e6)
    try:
        code = asyncio.run(serve(settings))
    except (KeyboardInterrupt, _StopBeforeServing):
        code = EXIT_OK
    except Exception:
        log.exception("convserve-server failed")
        code = EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
