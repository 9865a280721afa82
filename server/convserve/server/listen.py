"""Where the servers listen: the host forms each server library takes, and start-up failures.

Below `app` and `protocols.http`, which both bind ports, so neither imports the other.
"""

from __future__ import annotations


class StartupError(RuntimeError):
    """The server could not start (e.g. the port is taken); the message says why."""


def bind_host(host: str) -> str:
    """`host` as the HTTP server binds it: gRPC wants IPv6 literals in brackets, the
    HTTP server wants them bare."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


__all__ = ["StartupError", "bind_host"]
