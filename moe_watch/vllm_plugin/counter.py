"""Inside a vLLM worker: bind to the MoE routers, count on the device, hand counts to the publisher.

Where routing is observed: vLLM's routers (``BaseRouter`` subclasses) call ``capture_fn(topk_ids)``
with *logical* expert ids, before any EPLB mapping, from inside the ``moe_forward`` custom op —
opaque to torch.compile, so the Python callback runs on every eager step and its kernels are
recorded into CUDA graphs. This is the hook vLLM's own ``--enable-return-routed-experts`` uses
(``bind_routed_experts_capturer``); we chain to any callback already there.

How a step is counted, without a host sync: ``acc[layer].index_add_(0, topk_ids.flatten(),
weights[...])`` into a persistent ``[layers, experts + 1]`` int64 tensor on the model's device.
``weights`` is a persistent 0/1 tensor, one entry per (token position, top-k slot): the worker
sets its first ``tokens x top_k`` entries to 1 before each real step (``tokens`` = the step's
scheduled tokens) and leaves the rest 0. So warm-up (profiling, compile, CUDA-graph capture,
JIT warm-up), DP dummy batches and the padding rows of a CUDA-graph batch add nothing, also
when a captured graph is replayed (it reads ``weights`` at replay time). On a steady batch size
the step costs one Python comparison; a change costs one ``fill_`` launch.

Who counts: every worker that holds MoE layers, except that without sequence-parallel MoE the
TP ranks > 0 see the same tokens as TP rank 0 and do not bind at all. Under data parallelism a
router may see every DP rank's tokens; only this rank's rows are counted (the same slicing as
vLLM's RoutedExpertsCapturer), so files of different DP ranks add up.

Copying out: the publisher thread takes ``lock`` (held by the worker during each step and during
warm-up, so a copy never overlaps a CUDA-graph capture), queues a non-blocking copy on a side
stream into pinned memory, releases the lock and waits for the copy on its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_watch.expert_file import All2AllTimes, CountsFile, StepCoverage, counts_file_name
from moe_watch.signals.expert_placement import STRATEGIES, expert_ranks
from moe_watch.vllm_plugin import config_readers as read
from moe_watch.vllm_plugin.all2all import All2AllTimer, attach_timer, bind_timer
from moe_watch.vllm_plugin.config_readers import DEFAULT_INTERVAL_SECONDS, Layout
from moe_watch.vllm_plugin.coverage import CoverageSampler
from moe_watch.vllm_plugin.hooks import Hook, find_hooks
from moe_watch.vllm_plugin.logs import log, vllm_version, warn_once
from moe_watch.vllm_plugin.publisher import Publisher

DEFAULT_DIR = "/tmp/moe-watch/experts"
COUNTER_ATTRIBUTE = "_moe_watch_counter"


class ExpertCounter:
    def __init__(
        self,
        hooks: list[Hook],
        *,
        device: Any,
        top_k: int,
        num_experts: int,
        cap_tokens: int,
        layout: Layout,
        model: str = "",
        placement: list[int] | None = None,
        path: Path | None = None,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        forward_context: Callable[[], Any] | None = None,
    ) -> None:
        import torch

        self._torch = torch
        self.hooks = hooks
        self.layers = [hook.layer for hook in hooks]
        self.top_k = top_k
        self.num_experts = num_experts
        self.cap_tokens = cap_tokens
        self.layout = layout
        self.model = model
        self.placement = placement or []
        self.device = torch.device(device)
        # Column num_experts collects clamped out-of-range ids; it is never published.
        self.accumulator = torch.zeros(
            (len(hooks), num_experts + 1), dtype=torch.int64, device=self.device
        )
        self.weights = torch.zeros(cap_tokens * top_k, dtype=torch.int64, device=self.device)
        self.limit = 0  # tokens whose weights are 1
        self.lock = threading.RLock()
        self.counting = False
        self.failed = False
        self.started = 0.0
        self._warming = 0
        self._forward_context = forward_context
        self._dp_aware = layout.dp_size > 1 or layout.sp_size > 1
        self.path = path or Path(os.environ.get("MOE_WATCH_EXPERTS_DIR") or DEFAULT_DIR) / (
            counts_file_name(socket.gethostname(), os.getpid())
        )
        self.publisher = Publisher(self.path, interval, self.snapshot)
        self._cuda = self.device.type == "cuda"
        self._host: Any = None
        self._host_distinct: Any = None
        self._side_stream: Any = None
        self._copied: Any = None
        self.all2all: All2AllTimer | None = None  # set by attach under expert parallelism
        # Experts touched per sampled step; not under sequence-parallel MoE (a shard of a step).
        self.coverage: CoverageSampler | None = (
            CoverageSampler(self.accumulator, num_experts, cuda=self._cuda)
            if layout.sp_size == 1
            else None
        )

    # -- binding

    @classmethod
    def attach(cls, worker: Any) -> ExpertCounter | None:
        """Bind to the worker's loaded model (after load_model). None when nothing to count."""
        existing = worker.__dict__.get(COUNTER_ATTRIBUTE)
        if isinstance(existing, ExpertCounter):
            existing.bind()
            return existing
        runner = worker.model_runner
        model = runner.get_model()
        vllm_config = getattr(worker, "vllm_config", None) or getattr(runner, "vllm_config", None)
        model_config = getattr(vllm_config, "model_config", None)
        declared = read.call_int(model_config, "get_num_experts")
        hooks, missing = find_hooks(model)
        if missing:
            warn_once(
                "missing",
                "not counting %d MoE layer(s): %s",
                len(missing),
                "; ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""),
            )
        if not hooks:
            if declared > 0 or missing:
                warn_once(
                    "no-hooks",
                    "the model has MoE layers but no router capture hook was found "
                    "(no MoERunner with router.set_capture_fn); not counting",
                )
            else:
                log.info("moe-watch plugin: not an MoE model; nothing to count")
            return None
        layout = read.layout(vllm_config, hooks[0].module)
        if layout.pcp_size > 1:
            warn_once("pcp", "prefill context parallelism is not supported; not counting")
            return None
        if layout.sp_size == 1 and layout.tp_rank != 0:
            log.debug("moe-watch plugin: TP rank %d routes what rank 0 does", layout.tp_rank)
            return None
        moe_config = getattr(hooks[0].module, "moe_config", None)
        top_k = (
            read.call_int(model_config, "get_num_experts_per_tok")
            or int(getattr(moe_config, "experts_per_token", 0) or 0)
            or int(getattr(hooks[0].owner, "top_k", 0) or 0)
        )
        # Logical experts: the model's, or the widest layer's (counts are [layer][expert]).
        num_experts = max(declared, *(read.logical_experts(hook.module) for hook in hooks))
        if top_k <= 0 or num_experts < top_k:
            warn_once(
                "shape",
                "cannot tell top_k (%s) / experts (%s); not counting",
                top_k,
                num_experts,
            )
            return None
        device = read.device_of(hooks[0].module)
        if read.traced_platform(device):
            # vLLM calls the MoE layer directly on CPU: torch.compile traces our callback into
            # the model's graph. The DP slicing reads per-step host metadata a trace would
            # freeze, so DP is not counted there; and the compile cache must not hand a graph
            # compiled with the plugin to a server without it, or the other way round.
            if layout.dp_size > 1 or layout.sp_size > 1:
                warn_once("cpu-dp", "data parallelism on a CPU backend is not supported")
                return None
            read.mark_compile_cache(vllm_config)
        eplb = bool(getattr(getattr(moe_config, "moe_parallel_config", None), "enable_eplb", False))
        strategy = str(getattr(hooks[0].module, "expert_placement_strategy", "linear"))
        counter = cls(
            hooks,
            device=device,
            top_k=top_k,
            num_experts=num_experts,
            cap_tokens=read.cap_tokens(vllm_config),
            layout=layout,
            model=read.served_model_name(model_config),
            # EPLB moves experts at run time; an unknown strategy has no placement we can name.
            placement=expert_ranks(num_experts, layout.ep_size, strategy)
            if not eplb and layout.ep_size > 1 and strategy in STRATEGIES
            else [],
            interval=read.interval_seconds(),
            forward_context=read.forward_context_getter()
            if layout.dp_size > 1 or layout.sp_size > 1
            else None,
        )
        counter.bind()
        try:
            counter.all2all = attach_timer(
                [hook.module for hook in hooks if hook.module is not None],
                device,
                read.all2all_backend(vllm_config),
                layout.ep_size,
            )
        except Exception:  # timing is optional: counting goes on without it
            warn_once("a2a-attach", "all-to-all timing is off: attaching failed", exc_info=True)
        worker.__dict__[COUNTER_ATTRIBUTE] = counter
        log.info(
            "moe-watch plugin: counting %d MoE layers x %d experts (top-%d) on %s into %s",
            len(hooks),
            num_experts,
            top_k,
            counter.device,
            counter.path,
        )
        return counter

    def bind(self) -> None:
        """Install our callback on every hook, chaining to whatever is there (idempotent).

        Called after load_model and again when warm-up begins: vLLM binds its own capturer
        (--enable-return-routed-experts) at KV-cache setup, replacing callbacks set before.
        """
        if self.all2all is not None:
            bind_timer(
                self.all2all, [hook.module for hook in self.hooks if hook.module is not None]
            )
        for index, hook in enumerate(self.hooks):
            current = hook.get()
            if getattr(current, "_moe_watch_counter", None) is self:
                continue
            hook.set(self._make_capture(index, current, hook.clamp))

    def _make_capture(
        self, index: int, previous: Callable[[Any], None] | None, clamp: bool
    ) -> Callable[[Any], None]:
        torch = self._torch
        compiling = torch.compiler.is_compiling
        row = self.accumulator[index]
        weights = self.weights
        k = self.top_k
        cap = self.cap_tokens
        overflow = self.num_experts
        index_dtypes = (torch.int32, torch.int64)
        counter = self

        def count(topk_ids: Any, start: int, stop: int, position: int) -> None:
            stop = min(stop, start + cap - position)  # beyond cap: padding (limit <= cap)
            if stop <= start:
                return
            ids = topk_ids if start == 0 and stop == topk_ids.shape[0] else topk_ids[start:stop]
            if ids.shape[1] != k:
                if ids.shape[1] < k:
                    raise ValueError(f"routing ids have {ids.shape[1]} columns, top_k is {k}")
                ids = ids[:, :k]  # extra columns (fused shared experts) are not routed experts
            flat = ids.reshape(-1)
            if clamp:
                flat = flat.clamp(0, overflow)
            if flat.dtype not in index_dtypes:
                flat = flat.long()
            row.index_add_(0, flat, weights[position * k : position * k + flat.shape[0]])

        def traced(topk_ids: Any) -> None:
            """What torch.compile records when vLLM calls the MoE layer directly (its CPU path).

            Only tensor ops and static decisions (dtype, top-k width): nothing may graph-break
            (vLLM compiles with fullgraph) or depend on the batch size the trace happened to see.
            Rows never exceed ``cap`` here (one DP rank: a step's tokens, padding included).
            """
            ids = topk_ids[:, :k] if topk_ids.shape[1] > k else topk_ids
            if ids.shape[1] == k:
                flat = ids.reshape(-1)
                if clamp:
                    flat = flat.clamp(0, overflow)
                if flat.dtype not in index_dtypes:
                    flat = flat.long()
                row.index_add_(0, flat, weights[: flat.shape[0]])

        if self._dp_aware or clamp:

            def capture(topk_ids: Any) -> None:
                if compiling():
                    if not counter._dp_aware:  # attach refuses DP where the MoE is traced
                        traced(topk_ids)
                elif not counter.failed:
                    try:
                        if counter._dp_aware:
                            span = counter.own_rows(topk_ids.shape[0])
                            if span is not None:
                                count(topk_ids, *span)
                        else:
                            count(topk_ids, 0, topk_ids.shape[0], 0)
                    except Exception:
                        counter.fail("counting a routing step failed")
                if previous is not None:
                    previous(topk_ids)

        else:
            # The common case (one DP rank, a standard router), kept to one Python call and
            # one kernel: the weight views of decode-sized batches are made once.
            views: dict[int, Any] = {}
            fast_rows = min(1024, cap)

            def capture(topk_ids: Any) -> None:
                if compiling():
                    traced(topk_ids)
                elif not counter.failed:
                    try:
                        rows = topk_ids.shape[0]
                        if (
                            rows <= fast_rows
                            and topk_ids.shape[1] == k
                            and topk_ids.dtype in index_dtypes
                        ):
                            view = views.get(rows)
                            if view is None:
                                view = views[rows] = weights[: rows * k]
                            row.index_add_(0, topk_ids.reshape(-1), view)
                        else:
                            count(topk_ids, 0, rows, 0)
                    except Exception:
                        counter.fail("counting a routing step failed")
                if previous is not None:
                    previous(topk_ids)

        capture._moe_watch_counter = self  # type: ignore[attr-defined]
        return capture

    def own_rows(self, rows: int) -> tuple[int, int, int] | None:
        """(start, stop, position of start in this DP rank's token sequence) of this rank's rows.

        Under DP a router sees either this rank's tokens or every rank's (naive dispatch);
        under sequence-parallel MoE each TP rank routes one contiguous shard of its DP rank's
        tokens, alone or gathered with all the others. Same cases as vLLM's capturer.
        """
        context = self._forward_context() if self._forward_context else None
        metadata = getattr(context, "dp_metadata", None)
        if metadata is None:
            return 0, rows, 0
        tokens = [int(t) for t in metadata.num_tokens_across_dp_cpu.tolist()]
        layout = self.layout
        local = tokens[layout.dp_rank]
        sp = layout.sp_size
        if sp > 1:
            sizes = getattr(metadata, "local_sizes", None)
            if sizes is not None and rows == sum(sizes):
                shard = layout.dp_rank * sp + layout.tp_rank
                start = sum(sizes[:shard])
                return start, start + sizes[shard], layout.tp_rank * sizes[shard]
            size = -(-local // sp)
            if rows == size:
                return 0, rows, layout.tp_rank * size
        else:
            if rows == sum(tokens):
                end = sum(tokens[: layout.dp_rank + 1])
                return end - local, end, 0
            if rows == local:
                return 0, rows, 0
        warn_once(
            "layout",
            "a routing batch of %d rows does not match the DP layout %s (sp %d); such steps "
            "are not counted",
            rows,
            tokens,
            sp,
        )
        return None

    # -- the worker's calls

    def warm_up_begins(self) -> None:
        self._warming += 1
        try:
            self.bind()
            self.set_limit(0)
        except Exception:
            self.fail("re-binding before warm-up failed")

    def warm_up_ends(self, *, succeeded: bool) -> None:
        self._warming = max(0, self._warming - 1)
        if succeeded and not self._warming:
            self.start_counting()

    def begin_step(self, scheduler_output: Any) -> None:
        """Before a real step: weight its tokens (and only them) with 1."""
        if self.failed:
            return
        try:
            if not self.counting:
                if self._warming:
                    return  # a warm-up step driven through execute_model (V2 runner)
                log.info("moe-watch plugin: no warm-up seen; counting from the first step")
                self.start_counting()
            self.set_limit(int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0))
        except Exception:
            self.fail("preparing a step failed")
            return
        if self.coverage is not None:
            try:
                self.coverage.step_begins(self.limit)
            except Exception:
                self.coverage_fails("preparing a coverage sample failed")
        if self.all2all is not None:
            self.all2all.step_begins()

    def end_step(self, *, completed: bool = True) -> None:
        """After a real step (also one that raised, ``completed`` False): close the step's
        coverage sample and all-to-all time."""
        if self.coverage is not None:
            try:
                self.coverage.step_ends(completed)
            except Exception:
                self.coverage_fails("measuring a step's coverage failed")
        if self.all2all is not None:
            self.all2all.step_ends()

    def coverage_fails(self, what: str) -> None:
        """Stop measuring coverage for good; counting and serving go on (the file has none)."""
        self.coverage = None
        warn_once(
            "coverage-failed",
            "%s; expert coverage is not measured any more, counting and serving are not affected",
            what,
            exc_info=True,
        )

    def set_limit(self, tokens: int) -> None:
        tokens = max(0, min(tokens, self.cap_tokens))
        old = self.limit
        if tokens == old or self.failed:
            return
        k = self.top_k
        with self._torch.inference_mode():  # buffers may be touched inside and outside it
            if tokens > old:
                self.weights[old * k : tokens * k].fill_(1)
            else:
                self.weights[tokens * k : old * k].fill_(0)
        self.limit = tokens

    def start_counting(self) -> None:
        if self.counting or self.failed:
            return
        try:
            if self._cuda:  # the copy path: made here, on the worker thread, outside any capture
                torch = self._torch
                self._host = torch.zeros(self.accumulator.shape, dtype=torch.int64, pin_memory=True)
                if self.coverage is not None:
                    shape = self.coverage.distinct.shape
                    self._host_distinct = torch.zeros(shape, dtype=torch.int64, pin_memory=True)
                self._side_stream = torch.cuda.Stream(device=self.device)
                self._copied = torch.cuda.Event()
            self.started = time.time()
            self.publisher.start()
        except Exception:  # called from vLLM's warm-up and step: must not raise into them
            self.fail("starting the publisher failed")
            return
        self.counting = True

    def fail(self, what: str) -> None:
        """Stop counting for good (serving goes on); the publisher removes the file."""
        self.failed = True
        warn_once(
            "failed",
            "%s; counting stopped, serving is not affected",
            what,
            exc_info=True,
        )

    # -- the publisher's call

    def counts(self) -> list[list[int]]:
        """The accumulator on the host. Called by the publisher thread, never the worker's."""
        return self.copy_out()[0]

    def copy_out(self) -> tuple[list[list[int]], StepCoverage | None]:
        """The accumulator and the coverage on the host (the publisher thread's call).

        The host tallies of the coverage are read under the lock, while no step runs; on CUDA
        the side stream first waits for the last sampled step's device ops (an event, not a
        host sync), so the device sums copied with them are those of the same steps.
        """
        torch = self._torch
        coverage = self.coverage
        with self.lock:  # not during a step or a warm-up (no copy can overlap a graph capture)
            tallies = coverage.file_field([]) if coverage is not None else None
            distinct: Any = None
            if self._cuda:
                with torch.cuda.stream(self._side_stream):
                    if coverage is not None and coverage.any_sampled:
                        self._side_stream.wait_event(coverage.done)
                    self._host.copy_(self.accumulator, non_blocking=True)
                    if coverage is not None:
                        self._host_distinct.copy_(coverage.distinct, non_blocking=True)
                    self._copied.record(self._side_stream)
                host = None
            else:
                host = self.accumulator.to("cpu", copy=True)
                if coverage is not None:
                    distinct = coverage.distinct.to("cpu", copy=True)
        if host is None:
            self._copied.synchronize()  # waits for our copy only, outside the lock
            host = self._host
            distinct = self._host_distinct if coverage is not None else None
        counts: list[list[int]] = host[:, : self.num_experts].tolist()
        if tallies is None or distinct is None:
            return counts, None
        return counts, replace(tallies, distinct=distinct.tolist())

    def snapshot(self) -> CountsFile | None:
        if self.failed:
            return None
        layout = self.layout
        counts, coverage = self.copy_out()
        return CountsFile(
            pid=os.getpid(),
            started=self.started,
            updated=time.time(),
            model=self.model,
            top_k=self.top_k,
            num_experts=self.num_experts,
            layers=list(self.layers),
            counts=counts,
            vllm_version=vllm_version(),
            dp_rank=layout.dp_rank,
            tp_rank=layout.tp_rank,
            pp_rank=layout.pp_rank,
            ep_rank=layout.ep_rank,
            ep_size=layout.ep_size,
            sequence_parallel=layout.sp_size > 1,
            placement=list(self.placement),
            all2all=self.all2all_times(),
            coverage=coverage,
        )

    def all2all_times(self) -> All2AllTimes | None:
        timer = self.all2all
        if timer is None:
            return None
        field = timer.file_field()
        return All2AllTimes(**field) if field is not None else None
