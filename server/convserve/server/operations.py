"""The operations that use no model: Convolve (merged or alone) and FitKernel,
plus the shared pool every operation computes in (GetFeatureMaps too).

They compute in `work.WorkPool` threads: admitted by their estimated cost,
stopped at their deadline, when their caller goes or when they overrun.
Concurrent cheap Convolve requests with the same kernel, bias, options and
item shape are merged along N into one call.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from convserve.server import convolution, costs, errors, kernel_fit, types
from convserve.server.batch_runs import AwaitedRuns
from convserve.server.batcher import BatchObserver, DynamicBatcher, SummingObserver
from convserve.server.metrics import Metrics
from convserve.server.settings import Settings
from convserve.server.work import Work, WorkPool

T = TypeVar("T")

# Convolve requests with kernels up to this size may be merged with same-kernel requests.
MERGE_MAX_KERNEL_ELEMENTS = 4096
# Only requests estimated at one unit of work or less are merged, into calls of at most
# this many estimated seconds: a merged call runs on when its callers leave, so it is
# kept short rather than made cancellable.
MERGED_CALL_S = 4 * costs.UNIT_S
# Convolve inputs up to this size are validated on the event loop, larger ones in a thread.
SMALL_INPUT_ELEMENTS = 1 << 16
# Operations (Convolve, FitKernel, GetFeatureMaps) that may wait for a worker at once.
MAX_WAITING_OPERATIONS = 256
# Estimated CPU seconds that may wait for a worker: this many maximal requests per worker.
WAITING_MAXIMAL_REQUESTS = 4
# Bytes of an answer besides its output tensor's values (names, shapes, framing).
RESPONSE_OVERHEAD_BYTES = 64 * 1024


def check_deadline(deadline: float | None, what: str) -> None:
    """Raise errors.DeadlineExceeded if `deadline` (time.monotonic()) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise errors.DeadlineExceeded(f"{what}: the deadline passed before the work started")


def _merge_key(value: types.ConvolveInput) -> tuple[Any, ...] | None:
    """What Convolve requests must share to be merged into one call; None: run alone.

    Only well-formed requests with small kernels are merged (the kernel's
    bytes are part of the key); anything else takes the plain path, where
    `convolution.convolve` reports what is wrong.
    """
    x, k, b = value.input, value.kernel, value.bias
    if not isinstance(x, np.ndarray) or not isinstance(k, np.ndarray):
        return None
    if b is not None and not isinstance(b, np.ndarray):
        return None
    if x.ndim not in (2, 4) or k.ndim != x.ndim or x.size == 0:
        return None
    if k.size > MERGE_MAX_KERNEL_ELEMENTS or x.dtype != k.dtype:
        return None
    if b is not None and (b.dtype != x.dtype or b.size > MERGE_MAX_KERNEL_ELEMENTS):
        return None
    item_shape = x.shape if x.ndim == 2 else x.shape[1:]
    bias_key = None if b is None else (b.shape, b.tobytes())
    return (x.ndim, item_shape, x.dtype.str, k.shape, k.tobytes(), bias_key, value.options)


class Operations:
    """Convolve, FitKernel and the pool every operation computes in.

    `device` is the TensorFlow device operations run on; `is_open()` says
    whether new work is accepted (False: errors.Unavailable).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        is_open: Callable[[], None],
        device: Callable[[], str],
    ) -> None:
        self.settings = settings
        self._check_open = is_open
        self._device = device
        slots = max(1, settings.max_concurrent_batches)
        # Inputs of waiting operations held in memory: a few maximal requests' worth.
        self._max_waiting_elements = 4 * settings.max_conv_elements
        self._work = WorkPool(
            slots=slots,
            max_waiting=MAX_WAITING_OPERATIONS,
            max_waiting_elements=self._max_waiting_elements,
            max_waiting_s=WAITING_MAXIMAL_REQUESTS * slots * settings.max_request_cpu_s,
            observer=metrics,
        )
        self._convolve_observer = SummingObserver(
            metrics.batch_observer("Convolve"),
            lambda: sum(b.queued_items for b, _ in self._conv_batchers.values()),
        )
        # Convolve requests that can share a model call (same kernel, bias, options and
        # item shape) go through one batcher per such group: [batcher, requests using it].
        self._conv_batchers: dict[tuple[Any, ...], tuple[DynamicBatcher, list[int]]] = {}
        self._conv_pending_elements = 0
        self._closing_batchers: set[asyncio.Task[None]] = set()
        self._observers = {rpc: metrics.batch_observer(rpc) for rpc in ("Convolve", "FitKernel")}
        self._model_observers: dict[str, BatchObserver] = {}
        self._metrics = metrics

    @property
    def device(self) -> str:
        return self._device()

    @property
    def running(self) -> int:
        """Operations computing now."""
        return self._work.running

    def close_batchers(self) -> list[asyncio.Future[Any]]:
        """Start draining the merging batchers (at shutdown); returns what to await."""
        batchers = [b for b, _ in self._conv_batchers.values()]
        self._conv_batchers.clear()
        closing: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(b.close(drain=True)) for b in batchers
        ]
        return closing + list(self._closing_batchers)

    async def close(self, timeout_s: float) -> bool:
        """Refuse new work; stop running work at its next unit. False if some would not stop."""
        return await self._work.close(timeout_s)

    def forget_model(self, model: str) -> None:
        """Drop the observers of a model that is no longer configured."""
        for key in [k for k in self._model_observers if k.endswith(f"/{model}")]:
            del self._model_observers[key]

    def _observer(self, rpc: str, model: str) -> BatchObserver:
        if not model:
            return self._observers[rpc]
        key = f"{rpc}/{model}"
        observer = self._model_observers.get(key)
        if observer is None:
            observer = self._metrics.batch_observer(rpc, model)
            self._model_observers[key] = observer
        return observer

    async def run_op(
        self,
        rpc: str,
        deadline: float | None,
        rows: int,
        elements: int,
        estimate_s: float,
        fn: Callable[[Work], T],
        *,
        observe: bool = True,
        model: str = "",
    ) -> T:
        """Run a blocking operation in the work pool (see `work.WorkPool`).

        `estimate_s` is the operation's estimated CPU seconds: it counts
        against the waiting-work bound and sets when the work is stopped as
        an overrun. `fn` gets the `Work` ticket and calls `work.check()`
        between its units of work.
        """
        self._check_open()
        check_deadline(deadline, rpc)
        # A request over the element limit is refused by convolution or kernel_fit with a
        # clear message; count it as the limit here so that it reaches that check.
        elements = min(elements, self.settings.max_conv_elements)
        enqueued = time.monotonic()
        started: list[float] = []

        def run(work: Work) -> T:
            started.append(time.monotonic())
            return fn(work)

        work = Work(rpc, estimate_s, deadline)
        result = await self._work.run(work, elements, run)
        if observe:
            begun = started[0] if started else enqueued
            self._observer(rpc, model).on_batch(
                rows, rows, [begun - enqueued], time.monotonic() - begun
            )
        return result

    async def _validated_plan(self, value: types.ConvolveInput) -> convolution.ConvPlan:
        """`convolution.validate_convolve` against the server's limits; in a thread for
        large inputs (its NaN/Inf scan is proportional to the input)."""
        x = value.input
        size = int(x.size) if isinstance(x, np.ndarray) else 0
        if size > SMALL_INPUT_ELEMENTS:
            return await asyncio.to_thread(self._validate_convolve, value)
        return self._validate_convolve(value)

    async def convolve(
        self, value: types.ConvolveInput, *, deadline: float | None
    ) -> types.ConvolveOutput:
        """2-D convolution on the serving device (see `convolution.convolve`).

        Refused (INVALID_ARGUMENT) when estimated above max_request_cpu_s.
        Concurrent cheap requests (at most one unit of work each) with the
        same kernel, bias, options and item shape are merged along N into
        one call (each gets exactly its own result); others run on their
        own, in tiles that stop once the caller has gone. Either way at most
        max_concurrent_batches operations compute at once.
        """
        self._check_open()
        check_deadline(deadline, "Convolve")
        plan = await self._validated_plan(value)
        estimate_s = convolution.convolve_cost_s(plan)
        key = _merge_key(value) if estimate_s <= costs.UNIT_S else None
        if key is None:
            return await self._convolve_alone(value, deadline, plan, estimate_s)
        return await self._convolve_merged(key, value, deadline, plan, estimate_s)

    async def _convolve_alone(
        self,
        value: types.ConvolveInput,
        deadline: float | None,
        plan: convolution.ConvPlan,
        estimate_s: float,
    ) -> types.ConvolveOutput:
        settings = self.settings
        return await self.run_op(
            "Convolve",
            deadline,
            plan.n,
            int(value.input.size),
            estimate_s,
            lambda work: convolution.convolve(
                value,
                device=self.device,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
                max_cpu_s=settings.max_request_cpu_s,
                check=work.check,
            ),
        )

    async def _convolve_merged(
        self,
        key: tuple[Any, ...],
        value: types.ConvolveInput,
        deadline: float | None,
        plan: convolution.ConvPlan,
        estimate_s: float,
    ) -> types.ConvolveOutput:
        x = value.input
        size = int(x.size)
        # Inputs held by queued or running merged calls: a few maximal requests' worth.
        pending = self._conv_pending_elements
        if pending > 0 and pending + size > self._max_waiting_elements:
            raise errors.ResourceExhausted(
                f"Convolve: {pending} input elements are queued or computing "
                f"(at most {self._max_waiting_elements}); retry later"
            )
        items = x if x.ndim == 4 else x[None, :, :, None]
        entry = self._conv_batchers.get(key)
        if entry is None:
            item_s = estimate_s / max(1, plan.n)
            entry = (self._new_conv_batcher(value, items, item_s), [0])
            self._conv_batchers[key] = entry
        batcher, users = entry
        users[0] += 1
        self._conv_pending_elements += size
        try:
            out = await batcher.submit(items, deadline=deadline)
        finally:
            self._conv_pending_elements -= size
            users[0] -= 1
            if users[0] == 0 and self._conv_batchers.get(key) is entry:
                del self._conv_batchers[key]
                task = asyncio.get_running_loop().create_task(batcher.close(drain=True))
                self._closing_batchers.add(task)
                task.add_done_callback(self._closing_batchers.discard)
        return types.ConvolveOutput(output=out if x.ndim == 4 else out[0, :, :, 0])

    def _validate_convolve(self, value: types.ConvolveInput) -> convolution.ConvPlan:
        plan = convolution.validate_convolve(
            value,
            max_elements=self.settings.max_conv_elements,
            max_kernel_elements=self.settings.max_kernel_elements,
            max_cpu_s=self.settings.max_request_cpu_s,
        )
        # An answer larger than a gRPC message could never be sent: refuse before computing.
        out_bytes = math.prod(plan.output_shape) * value.input.dtype.itemsize
        limit = self.settings.max_message_bytes - RESPONSE_OVERHEAD_BYTES
        if out_bytes > limit:
            raise errors.InvalidArgument(
                "input",
                f"an output of at most {limit} bytes expected (the server's max_message_bytes "
                f"less {RESPONSE_OVERHEAD_BYTES} for the rest of the answer), this request "
                f"would produce {out_bytes}",
            )
        return plan

    def _new_conv_batcher(
        self, value: types.ConvolveInput, items: np.ndarray, item_s: float
    ) -> DynamicBatcher:
        """A batcher computing `value`'s kernel, bias and options on [B,H,W,C] batches.

        Its calls go through the work pool like every other operation, so
        they count against the same slots and waiting-work bounds.
        """
        settings = self.settings
        kernel = value.kernel if value.kernel.ndim == 4 else value.kernel[:, :, None, None]
        bias = None if value.bias is None else np.reshape(value.bias, (-1,))
        options = value.options
        device = self.device

        def compute(batch: np.ndarray, work: Work | None = None) -> np.ndarray:
            n = int(batch.shape[0])
            # Each request was checked against the limits; the merged call holds n items.
            result = convolution.convolve(
                types.ConvolveInput(batch, kernel, bias, options),
                device=device,
                max_elements=settings.max_conv_elements * n,
                max_kernel_elements=settings.max_kernel_elements,
                max_cpu_s=float("inf"),
                check=None if work is None else work.check,
                # One call, as each request alone would run: merged results stay exact.
                unit_s=float("inf"),
            )
            return result.output

        async def run(batch: np.ndarray, deadline: float | None = None) -> np.ndarray:
            n = int(batch.shape[0])
            return await self.run_op(
                "Convolve",
                deadline,
                n,
                int(batch.size),
                item_s * n,
                lambda work: compute(batch, work),
                observe=False,  # the batcher reports merged calls itself
            )

        # One merged call holds at most max_conv_elements input values and about
        # MERGED_CALL_S estimated seconds.
        item_elements = max(1, int(np.prod(items.shape[1:])))
        max_rows = min(
            settings.max_batch_size,
            settings.max_conv_elements // item_elements,
            int(MERGED_CALL_S / max(item_s, 1e-9)),
        )
        max_rows = max(1, max_rows)
        return DynamicBatcher(
            AwaitedRuns(run, clock=time.monotonic),
            name="Convolve",
            max_batch_size=max_rows,
            batch_timeout_s=settings.batch_timeout_s,
            max_queued_items=max(max_rows, settings.max_queued_images),
            max_concurrent_batches=settings.max_concurrent_batches,
            # No padding: eager convolutions do not retrace, padded rows would be wasted work.
            pad_sizes=range(1, max_rows + 1),
            observer=self._convolve_observer,
        )

    async def fit_kernel(
        self, value: types.FitKernelInput, *, deadline: float | None
    ) -> types.FitKernelOutput:
        """Fit a kernel by gradient descent within max_fit_steps and the time budget.

        The budget is fit_time_budget_s, capped by max_request_cpu_s and by
        the caller's deadline; the fit is admitted at its estimated cost
        (`kernel_fit.FitPlan.cost_s`), each gradient step at most
        `kernel_fit.FIT_MAX_STEP_S`.
        """
        self._check_open()
        check_deadline(deadline, "FitKernel")
        settings = self.settings
        budget = min(settings.fit_time_budget_s, settings.max_request_cpu_s)
        if deadline is not None:
            # Leave time to send the answer back before the caller gives up.
            budget = min(budget, max(0.0, (deadline - time.monotonic()) * 0.9))
        x = value.inputs
        size = int(x.size) * 2 if isinstance(x, np.ndarray) else 0  # inputs and targets

        def validate() -> kernel_fit.FitPlan:
            return kernel_fit.validate_fit(
                value,
                max_steps=settings.max_fit_steps,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
            )

        # Its NaN/Inf scan is proportional to the input: large ones are checked in a thread.
        fit = await asyncio.to_thread(validate) if size > SMALL_INPUT_ELEMENTS else validate()
        return await self.run_op(
            "FitKernel",
            deadline,
            fit.plan.n,
            size,
            fit.cost_s(budget),
            lambda work: kernel_fit.fit_kernel(
                value,
                device=self.device,
                max_steps=settings.max_fit_steps,
                time_budget_s=budget,
                max_elements=settings.max_conv_elements,
                max_kernel_elements=settings.max_kernel_elements,
                check=work.check,
            ),
        )
