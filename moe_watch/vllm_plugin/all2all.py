"""Times the expert-parallel exchange (dispatch + combine) of the MoE layers, per forward pass.

Under expert parallelism every MoE layer sends its tokens to the ranks that hold their experts
(dispatch) and brings the results back (combine). vLLM 0.32 does that in one of two places,
and the plugin wraps the instance methods of whichever the worker uses:

- the EP group's **all2all manager** (``get_ep_group().device_communicator.all2all_manager``):
  ``dispatch_router_logits``/``dispatch`` and ``combine``/``combine_into_output``. This is the
  ``allgather_reducescatter`` backend (``naive`` is an alias of it), the only one on CPU, and
  what the naive DP/EP prepare/finalize and the MoE runner's naive path call.
- the modular MoE kernel's **prepare/finalize object** of each layer for the backends that talk
  to their own buffers (DeepEP high-throughput / low-latency / v2, NIXL EP, FlashInfer NVLink
  one- and two-sided, MORI, MoonEP): ``prepare``/``finalize``, or ``prepare_async`` /
  ``finalize_async`` up to the return of the receiver they hand back (so the time of an async
  exchange includes the work vLLM overlaps with it, e.g. shared experts).

A timed call nested in another (a prepare that calls the manager) is counted once. Only real
steps are timed (not warm-up, not DP dummy batches), nothing while torch.compile traces
(Dynamo would trace the clock), nothing while a CUDA graph is captured (so steps replayed from
CUDA graphs are not timed).

How, without a host sync in the step: on a CUDA device each timed call records two
``torch.cuda.Event(enable_timing=True)`` on the current stream; at the end of the step its
events are queued, and the publisher thread reads ``elapsed_time`` only once ``query()`` says
the end events completed (never ``synchronize``). On other devices (CPU) the calls are
synchronous and are timed with ``time.perf_counter``. Each step's total goes into a histogram
(``BOUNDS``) that is written with the counts (``all2all`` in the file).

Anything unexpected (a backend we do not know, a method that cannot be wrapped, an exception
in the timing code) is logged once and turns timing off; the wrapped vLLM call always runs.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from moe_watch.vllm_plugin.logs import log, warn_once

# Upper bounds of the histogram of per-forward-pass all-to-all time, seconds. The design's
# thresholds (healthy < 5 ms, alert > 20 ms per forward pass) are bounds, so quantiles near them
# interpolate inside one bucket.
BOUNDS = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02,
    0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

MANAGER_METHODS = ("dispatch_router_logits", "dispatch", "combine", "combine_into_output")
# Prepare/finalize classes that exchange tokens themselves (vLLM 0.32 fused_moe/prepare_finalize).
TIMED_PREPARE_FINALIZE = frozenset(
    {
        "DeepEPHTPrepareAndFinalize",
        "DeepEPLLPrepareAndFinalize",
        "DeepEPV2PrepareAndFinalize",
        "NixlEPPrepareAndFinalize",
        "FlashInferNVLinkOneSidedPrepareAndFinalize",
        "FlashInferNVLinkTwoSidedPrepareAndFinalize",
        "MoriPrepareAndFinalize",
        "MoonEPPrepareAndFinalize",
    }
)
# Prepare/finalize classes with no exchange of their own (single rank, or the naive DP/EP one,
# which calls the all2all manager: timed there).
UNTIMED_PREPARE_FINALIZE = frozenset(
    {
        "MoEPrepareAndFinalizeNoDPEPModular",
        "MoEPrepareAndFinalizeNoDPEPMonolithic",
        "PassThroughPrepareAndFinalize",
        "BatchedPrepareAndFinalize",
        "MoEPrepareAndFinalizeNaiveDPEPModular",
        "MoEPrepareAndFinalizeNaiveDPEPMonolithic",
    }
)
SYNC_METHODS = ("prepare", "finalize")
ASYNC_METHODS = ("prepare_async", "finalize_async")
MAX_PENDING_STEPS = 64  # CUDA steps whose events have not completed yet; older ones are dropped
DEFAULT_CUDA_SAMPLE_EVERY = 4
MARK = "_moe_watch_all2all"

_NESTED = object()


def sample_every(cuda: bool) -> int:
    """Time one step in N (``MOE_WATCH_ALL2ALL_SAMPLE_EVERY``); CPU timing is cheap: every step."""
    raw = os.environ.get("MOE_WATCH_ALL2ALL_SAMPLE_EVERY", "")
    try:
        value = int(raw) if raw else (DEFAULT_CUDA_SAMPLE_EVERY if cuda else 1)
    except ValueError:
        value = DEFAULT_CUDA_SAMPLE_EVERY if cuda else 1
    return max(1, value)


class All2AllTimer:
    """Per-forward-pass all-to-all time of one worker, as a cumulative histogram."""

    def __init__(self, device: Any, *, backend: str = "", every: int | None = None) -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.backend = backend
        self.method = "cuda_events" if self.cuda else "perf_counter"
        self.every = every if every is not None else sample_every(self.cuda)
        self.buckets = [0] * (len(BOUNDS) + 1)  # per bucket (not cumulative); last = above 2.5 s
        self.sum = 0.0
        self.count = 0  # timed forward passes
        self.exchanges = 0  # timed dispatch/combine calls
        self.failed = False
        self.wrapped: list[str] = []  # what is timed, for the log line
        self._lock = threading.Lock()
        self._local = threading.local()
        self._steps = 0
        self._timing = False  # inside a real step that is sampled
        self._step_seconds = 0.0
        self._step_calls = 0
        self._step_events: list[tuple[Any, Any]] = []
        self._pending: deque[list[tuple[Any, Any]]] = deque()
        self._free_events: list[Any] = []

    # -- binding

    def wrap_manager(self, manager: Any) -> bool:
        """Time the all2all manager's dispatch/combine methods (instance attributes)."""
        names = [name for name in MANAGER_METHODS if callable(getattr(manager, name, None))]
        for name in names:
            self._wrap(manager, name, self._sync_wrapper)
        if names:
            self.wrapped.append(f"{type(manager).__name__}.{{{','.join(names)}}}")
        return bool(names)

    def wrap_prepare_finalize(self, prepare_finalize: Any) -> bool:
        """Time a modular kernel's prepare/finalize when it exchanges tokens itself."""
        name = type(prepare_finalize).__name__
        if getattr(prepare_finalize, MARK, None) is self:
            return True
        if name in UNTIMED_PREPARE_FINALIZE:
            return False
        if name not in TIMED_PREPARE_FINALIZE:
            warn_once(
                f"a2a-class:{name}",
                "all-to-all time not measured for %s (a prepare/finalize moe-watch does not "
                "know); serving is not affected",
                name,
            )
            return False
        for method in SYNC_METHODS:
            if callable(getattr(prepare_finalize, method, None)):
                self._wrap(prepare_finalize, method, self._sync_wrapper)
        for method in ASYNC_METHODS:
            if callable(getattr(prepare_finalize, method, None)):
                self._wrap(prepare_finalize, method, self._async_wrapper)
        setattr(prepare_finalize, MARK, self)
        self.wrapped.append(name)
        return True

    def _wrap(
        self, owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
    ) -> None:
        current = getattr(owner, name)
        if getattr(current, MARK, None) is self:
            return
        wrapper = make(current)
        setattr(wrapper, MARK, self)
        setattr(owner, name, wrapper)

    def _sync_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        timer = self
        compiling = self._torch.compiler.is_compiling

        def timed(*args: Any, **kwargs: Any) -> Any:
            if compiling() or not timer._timing:
                return original(*args, **kwargs)
            token = timer.begin()
            try:
                return original(*args, **kwargs)
            finally:
                timer.end(token)

        return timed

    def _async_wrapper(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """``prepare_async``/``finalize_async`` return ``receiver`` or ``(hook, receiver)``:
        the exchange ends when the receiver returns."""
        timer = self
        compiling = self._torch.compiler.is_compiling

        def timed(*args: Any, **kwargs: Any) -> Any:
            if compiling() or not timer._timing:
                return original(*args, **kwargs)
            token = timer.begin()
            try:
                result = original(*args, **kwargs)
            except BaseException:
                timer.end(token)
                raise
            if token is None or token is _NESTED:
                timer.end(token)
                return result
            timer.leave()  # not nested any more; the interval stays open until the receiver
            try:
                if isinstance(result, tuple) and len(result) == 2 and callable(result[1]):
                    return result[0], timer._closing(result[1], token)
                if callable(result):
                    return timer._closing(result, token)
            except Exception:
                timer.fail("wrapping an async receiver failed")
            return result

        return timed

    def _closing(self, receiver: Callable[..., Any], token: Any) -> Callable[..., Any]:
        def receive(*args: Any, **kwargs: Any) -> Any:
            try:
                return receiver(*args, **kwargs)
            finally:
                self.stop(token)

        return receive

    # -- the step (worker thread)

    def step_begins(self) -> None:
        if self.failed:
            return
        self._steps += 1
        self._timing = (self._steps - 1) % self.every == 0
        self._step_seconds, self._step_calls = 0.0, 0
        self._step_events = []
        self._local.depth = 0

    def step_ends(self) -> None:
        if not self._timing:
            return
        self._timing = False
        if self.failed:
            return
        try:
            if self.cuda:
                if self._step_events:
                    with self._lock:
                        if len(self._pending) >= MAX_PENDING_STEPS:
                            self._pending.popleft()  # never read: its events are simply dropped
                        self._pending.append(self._step_events)
                    self._step_events = []
            elif self._step_calls:
                self.observe(self._step_seconds, self._step_calls)
        except Exception:
            self.fail("ending a timed step failed")

    def begin(self) -> Any:
        """Start an interval: a token for ``end``, None when nothing is timed."""
        if self.failed:
            return None
        try:
            depth = getattr(self._local, "depth", 0)
            if depth:
                self._local.depth = depth + 1
                return _NESTED
            if self.cuda:
                torch = self._torch
                if torch.cuda.is_current_stream_capturing():
                    return None  # inside a CUDA graph capture: events cannot be read back
                start = self._event()
                start.record()
                token: Any = start
            else:
                token = time.perf_counter()
            self._local.depth = 1
            return token
        except Exception:
            self.fail("starting an all-to-all interval failed")
            return None

    def end(self, token: Any) -> None:
        if token is None:
            return
        self.leave()
        if token is not _NESTED:
            self.stop(token)

    def leave(self) -> None:
        self._local.depth = max(0, getattr(self._local, "depth", 1) - 1)

    def stop(self, token: Any) -> None:
        if self.failed:
            return
        try:
            if self.cuda:
                end = self._event()
                end.record()
                self._step_events.append((token, end))
            else:
                self._step_seconds += time.perf_counter() - token
                self._step_calls += 1
        except Exception:
            self.fail("ending an all-to-all interval failed")

    def _event(self) -> Any:
        with self._lock:
            if self._free_events:
                return self._free_events.pop()
        return self._torch.cuda.Event(enable_timing=True)

    # -- results (publisher thread)

    def observe(self, seconds: float, calls: int = 1) -> None:
        index = next((i for i, bound in enumerate(BOUNDS) if seconds <= bound), len(BOUNDS))
        with self._lock:
            self.buckets[index] += 1
            self.sum += seconds
            self.count += 1
            self.exchanges += calls

    def drain(self) -> None:
        """Read the completed CUDA steps' events (``query``, never a sync); keep the rest."""
        if not self.cuda or self.failed:
            return
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        return
                    step = self._pending[0]
                if not all(end.query() for _, end in step):
                    return  # the GPU has not got there yet: next interval
                seconds = sum(start.elapsed_time(end) for start, end in step) / 1000.0
                with self._lock:
                    if self._pending and self._pending[0] is step:
                        self._pending.popleft()
                    for start, end in step:
                        self._free_events.extend((start, end))
                self.observe(seconds, len(step))
        except Exception:
            self.fail("reading all-to-all events failed")

    def file_field(self) -> dict[str, Any] | None:
        """The ``all2all`` object of the counts file (docs/vllm-plugin.md); None when failed."""
        self.drain()
        if self.failed:
            return None
        with self._lock:
            return {
                "backend": self.backend,
                "method": self.method,
                "sample_every": self.every,
                "bounds": list(BOUNDS),
                "buckets": list(self.buckets),
                "count": self.count,
                "sum": self.sum,
                "exchanges": self.exchanges,
            }

    def fail(self, what: str) -> None:
        self.failed = True
        self._timing = False
        warn_once(
            "a2a-failed",
            "%s; all-to-all timing stopped, counting and serving are not affected",
            what,
            exc_info=True,
        )


def all2all_manager() -> Any:
    """The EP group's all2all manager, or None (EP off, not initialised, or moved)."""
    try:
        from vllm.distributed import parallel_state as ps

        group = ps.get_ep_group()
    except Exception:
        return None
    communicator = getattr(group, "device_communicator", None)
    return getattr(communicator, "all2all_manager", None)


def prepare_finalize_of(module: Any) -> Any:
    """The modular kernel's prepare/finalize of an MoE runner (vLLM 0.32), or None."""
    for path in (
        ("routed_experts", "quant_method", "moe_kernel", "prepare_finalize"),
        ("quant_method", "moe_kernel", "prepare_finalize"),
    ):
        obj = module
        for name in path:
            try:
                obj = getattr(obj, name, None)
            except Exception:
                obj = None
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def attach_timer(
    modules: list[Any], device: Any, backend: str, ep_size: int
) -> All2AllTimer | None:
    """A timer bound to what this worker's MoE layers exchange through; None under no EP."""
    if ep_size <= 1:
        return None
    timer = All2AllTimer(device, backend=backend)
    bind_timer(timer, modules)
    if not timer.wrapped:
        warn_once(
            "a2a-none",
            "expert parallelism is on (all2all backend %r) but no exchange moe-watch can time "
            "was found; all-to-all time is not published",
            backend or "unknown",
        )
        return None
    log.info("moe-watch plugin: timing the all-to-all of %s", ", ".join(timer.wrapped))
    return timer


def bind_timer(timer: All2AllTimer, modules: list[Any]) -> None:
    """(Re)bind: prepare/finalize objects are made when weights are processed (and may be
    replaced, e.g. by a weight update), so this runs after load_model and at warm-up."""
    try:
        manager = all2all_manager()
        fresh = manager is not None and getattr(manager, MARK, None) is not timer
        if fresh and timer.wrap_manager(manager):
            setattr(manager, MARK, timer)
        for module in modules:
            prepare_finalize = prepare_finalize_of(module)
            if prepare_finalize is not None:
                timer.wrap_prepare_finalize(prepare_finalize)
    except Exception:
        timer.fail("binding the all-to-all timer failed")
