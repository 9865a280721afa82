"""Settings shared by `ConvServeClient` and `AsyncConvServeClient`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from convserve.client.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    TlsConfig,
    as_tls_config,
    auth_metadata,
    channel_options,
)
from convserve.client.retry import Deadline, RetryPolicy, as_retry_policy

DEFAULT_TARGET = "localhost:8500"
DEFAULT_TIMEOUT_S = 30.0
# Below the server's default --max-images-per-request (1024): smaller requests
# also let the server's batcher spread one large call over several model batches.
DEFAULT_MAX_BATCH_IMAGES = 256
# Concurrent requests an async predict sends when it splits a large batch.
ASYNC_SPLIT_CONCURRENCY = 4


@dataclass(frozen=True)
class ClientConfig:
    target: str
    timeout_s: float | None
    tls: TlsConfig | None
    metadata: tuple[tuple[str, str], ...]
    retry: RetryPolicy
    max_batch_images: int
    model_name: str
    options: list[tuple[str, Any]]
    clock: Callable[[], float]

    def deadline(self, timeout_s: float | None) -> Deadline:
        """A per-call timeout overrides the client's default."""
        return Deadline(self.timeout_s if timeout_s is None else timeout_s, self.clock)


def make_config(
    target: str,
    *,
    timeout_s: float | None,
    tls: bool | TlsConfig | None,
    token: str | None,
    retries: int | RetryPolicy,
    max_batch_images: int,
    model_name: str,
    clock: Callable[[], float] = time.monotonic,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> ClientConfig:
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s}")
    if max_batch_images < 1:
        raise ValueError(f"max_batch_images must be >= 1, got {max_batch_images}")
    tls_config = as_tls_config(tls)
    return ClientConfig(
        target=target,
        timeout_s=timeout_s,
        tls=tls_config,
        metadata=auth_metadata(token),
        retry=as_retry_policy(retries),
        max_batch_images=max_batch_images,
        model_name=model_name,
        options=channel_options(max_message_bytes=max_message_bytes, tls=tls_config),
        clock=clock,
    )


def new_rng() -> random.Random:
    """Jitter needs no reproducibility, only independence between clients."""
    return random.Random()
