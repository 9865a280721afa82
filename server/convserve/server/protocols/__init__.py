"""Other serving protocols on the convserve port.

Each adapter adds its gRPC services to the server and returns their full
names (for reflection and health). Its servicers translate the protocol's
messages to the typed values of `convserve.server.types` and delegate to the
shared runtime, so every protocol shares the models, the batcher, the limits
and the metrics (labelled by protocol).
"""

from __future__ import annotations

from typing import Any, Protocol

from convserve.server.protocols.oip import OipAdapter
from convserve.server.protocols.tfserving import TfServingAdapter


class Adapter(Protocol):
    name: str

    def add_to_server(
        self,
        server: Any,
        runtime: Any,
        metrics: Any,
        *,
        max_typed_payload_bytes: int = ...,
        replica: str = ...,
    ) -> list[str]: ...


ADAPTERS: tuple[Adapter, ...] = (OipAdapter(), TfServingAdapter())
