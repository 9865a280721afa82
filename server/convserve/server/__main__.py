"""``convserve-server``: run the server until SIGTERM or SIGINT.

Exit codes: 0 after a graceful stop; 2 for unusable settings, a port that
cannot be bound or no loadable model (the reason is printed to stderr and
logged); 1 for anything unexpected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from convserve.server import errors
from convserve.server.logs import configure_logging
from convserve.server.settings import Settings, SettingsError

log = logging.getLogger("convserve.server")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"convserve-server: {message}", file=sys.stderr)
    return EXIT_USAGE


async def serve(settings: Settings) -> int:
    """Start, serve until SIGTERM/SIGINT, stop within grace_period_s; returns the exit code."""
    from convserve.server.app import StartupError, start_server

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
        await running.stop(settings.grace_period_s)
        return EXIT_OK
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
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
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception:
        log.exception("convserve-server failed")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
