"""The serving protocols on the convserve port: convserve.v1, the Open Inference
Protocol and TF Serving's gRPC APIs.

Each adapter adds its gRPC services to the server and returns their full
names (for reflection and health). Its servicers translate the protocol's
messages to the typed values of `convserve.server.types` and delegate to the
shared runtime, so every protocol shares the models, the batcher, the limits
and the metrics (labelled by protocol).
"""

from __future__ import annotations

from typing import Any, Protocol

from convserve.server import api
from convserve.server.protocols.calls import AdapterOptions
from convserve.server.protocols.convserve_grpc import ConvServeAdapter
from convserve.server.protocols.oip import OipAdapter
from convserve.server.protocols.tfserving import TfServingAdapter


class Adapter(Protocol):
    """One protocol's gRPC services. Every adapter takes every limit and applies those
    that concern its protocol."""

    name: str

    def add_to_server(
        self,
        server: Any,
        runtime: api.RuntimeApi,
        metrics: api.RequestMetrics,
        options: AdapterOptions = ...,
    ) -> list[str]: ...


ADAPTERS: tuple[Adapter, ...] = (ConvServeAdapter(), OipAdapter(), TfServingAdapter())
