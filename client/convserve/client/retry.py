"""Retries with exponential backoff and jitter, bounded by the caller's deadline.

Only UNAVAILABLE (server unreachable, restarting, no model yet) and
RESOURCE_EXHAUSTED (queue full) are retried: the same request may succeed a
moment later. Everything else, INVALID_ARGUMENT above all, would fail the
same way again. `Attempts` holds the decision logic so that the sync and
async clients only differ in how they sleep.

Why a loop of our own rather than gRPC's retry policy (the service config's
``retryPolicy``, which the channel uses only to retry calls a draining server
cancelled, see `convserve.client.channel`): gRPC treats a ``maxAttempts``
above 5 as 5, while `RetryPolicy.max_attempts` (and ``convserve --retries``)
may be any number, e.g. to keep retrying until the deadline while a server
restarts.

No retry throttling (gRPC's token bucket, which stops retries once too many
calls on a channel have failed): each call's retries are already bounded by
`max_attempts`, the backoff and its deadline, and a bucket shared by every
call of a client would make one call give up early because others failed,
ending exactly the waits through a restart that the retries are for.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from convserve.client.errors import ConvServeError, error_for, from_rpc_error

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts the first call; 1 disables retries.

    The n-th retry waits between (1 - jitter) and all of
    min(max_backoff_s, initial_backoff_s * multiplier**(n-1)), by default
    between half and all of it; the random part keeps many clients that
    failed together from retrying in lockstep. `jitter` 0 waits exactly that.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoff times must be >= 0 and the multiplier >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number `retry` (1 for the first retry)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return cap * (1.0 - self.jitter + self.jitter * rng.random())


def as_retry_policy(retries: int | RetryPolicy) -> RetryPolicy:
    """An int is the number of retries after the first attempt."""
    if isinstance(retries, RetryPolicy):
        return retries
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return RetryPolicy(max_attempts=retries + 1)


class Deadline:
    """A point in time after which a call (all its attempts and parts) must be over.

    `clock` gives the time in seconds (`time.monotonic`; tests pass a fake one).
    """

    def __init__(
        self, timeout_s: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._end = None if timeout_s is None else clock() + timeout_s

    def remaining_s(self) -> float | None:
        """Seconds left (may be <= 0), or None for no deadline."""
        return None if self._end is None else self._end - self._clock()


class Attempts:
    """The attempts of one RPC: how long each may take and whether to try again."""

    def __init__(self, policy: RetryPolicy, deadline: Deadline, rng: random.Random) -> None:
        self._policy = policy
        self._deadline = deadline
        self._rng = rng
        self.count = 0

    def timeout_s(self) -> float | None:
        """The timeout for the next attempt: all the time that is left.

        Raises DeadlineExceededError if none is left.
        """
        remaining = self._deadline.remaining_s()
        if remaining is not None and remaining <= 0:
            raise error_for(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {self._deadline.timeout_s:g} s passed",
                attempts=self.count,
            )
        return remaining

    def after_failure(self, error: grpc.RpcError) -> float:
        """Seconds to wait before trying again; raises the error when the call must fail.

        The call fails when the code is not retryable, the attempts are used
        up, or the wait would reach past the deadline (sleeping until then
        could only end in DEADLINE_EXCEEDED).
        """
        self.count += 1
        failure: ConvServeError = from_rpc_error(error, attempts=self.count)
        if failure.code not in RETRYABLE_CODES or self.count >= self._policy.max_attempts:
            raise failure from error
        delay = self._policy.backoff_s(self.count, self._rng)
        remaining = self._deadline.remaining_s()
        if remaining is not None and delay >= remaining:
            raise failure from error
        return delay
