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

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_watch.expert_file import CountsFile, counts_file_name
from moe_watch.vllm_plugin.publisher import Publisher

log = logging.getLogger("moe_watch.vllm_plugin")

DEFAULT_DIR = "/tmp/moe-watch/experts"
DEFAULT_INTERVAL_SECONDS = 2.0
COUNTER_ATTRIBUTE = "_moe_watch_counter"

# Routers whose ids are always logical experts in [0, num_experts): no clamp. Any other router
# (zero experts, fused shared experts, custom modules) gets its ids clamped into an overflow
# column, so an unexpected id can never index out of bounds (a device assert would kill serving).
SAFE_ROUTERS = frozenset(
    {
        "FusedTopKRouter",
        "GroupedTopKRouter",
        "FusedTopKBiasRouter",
        "CPURouter",
        "CustomRoutingRouter",
        "RoutingSimulatorRouter",
    }
)

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object, exc_info: bool = False) -> None:
    """One warning per problem per process: the plugin must not flood a serving log."""
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "moe-watch plugin (vLLM %s): " + message,
        vllm_version(),
        *args,
        exc_info=exc_info,
    )


def vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return "unknown"


# --- the worker methods we wrap -------------------------------------------------------------


def patch_worker_class(worker: Any) -> list[str]:
    """Wrap the worker methods the counter needs; returns the names wrapped.

    Only methods defined on this class itself are wrapped (a subclass that overrides one is
    patched separately), and a class is patched once.
    """
    if worker.__dict__.get("_moe_watch_patched", False):
        return []
    wrapped = []
    for name, make in (
        ("load_model", _wrap_load_model),
        ("compile_or_warm_up_model", _wrap_warm_up),
        ("execute_model", _wrap_execute_model),
        ("execute_dummy_batch", _wrap_dummy_batch),
    ):
        original = worker.__dict__.get(name)
        if callable(original):
            setattr(worker, name, make(original))
            wrapped.append(name)
    worker._moe_watch_patched = True
    return wrapped


def _counter_of(worker: Any) -> ExpertCounter | None:
    counter = worker.__dict__.get(COUNTER_ATTRIBUTE)
    return counter if isinstance(counter, ExpertCounter) and not counter.failed else None


def _wrap_load_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            ExpertCounter.attach(self)
        except Exception:
            warn_once(
                "attach",
                "not counting experts: binding to the model failed",
                exc_info=True,
            )
        return result

    return load_model


def _wrap_warm_up(original: Callable[..., Any]) -> Callable[..., Any]:
    def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter = _counter_of(self)
        if counter is None:
            return original(self, *args, **kwargs)
        counter.warm_up_begins()
        try:
            with counter.lock:
                result = original(self, *args, **kwargs)
        except BaseException:
            counter.warm_up_ends(succeeded=False)
            raise
        counter.warm_up_ends(succeeded=True)
        return result

    return compile_or_warm_up_model


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        counter = self.__dict__.get(COUNTER_ATTRIBUTE)
        if counter is None:
            return original(self, scheduler_output, *args, **kwargs)
        with counter.lock:
            counter.begin_step(scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

    return execute_model


def _wrap_dummy_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_dummy_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter = self.__dict__.get(COUNTER_ATTRIBUTE)
        if counter is None:
            return original(self, *args, **kwargs)
        with counter.lock:
            try:
                counter.set_limit(0)  # an idle DP rank's filler step is not traffic
            except Exception:
                counter.fail("preparing a dummy batch failed")
            return original(self, *args, **kwargs)

    return execute_dummy_batch


# --- finding the MoE layers -----------------------------------------------------------------


@dataclass
class Hook:
    """One MoE layer's capture point: where the callback lives and how to swap it."""

    layer: int
    owner: Any  # the object holding capture_fn (a router, a routing sink or a custom module)
    kind: str  # "router" | "sink" | "module"
    clamp: bool
    module: Any = None

    def get(self) -> Any:
        return getattr(self.owner, "capture_fn", None)

    def set(self, fn: Callable[[Any], None] | None) -> None:
        if self.kind == "router":
            self.owner.set_capture_fn(fn)
        else:
            self.owner.capture_fn = fn


def find_hooks(model: Any) -> tuple[list[Hook], list[str]]:
    """The capture points of ``model``'s MoE layers, and why any MoE layer has none.

    Mirrors vLLM's bind_routed_experts_capturer: custom modules with their own ``capture_fn``
    and ``layer_id``; ``MoERunner`` modules (``router`` + ``layer_id``) whose router has
    ``set_capture_fn``; monolithic kernels (routing fused into the kernel) only where vLLM's
    own capture already installed a routing sink, because adding one changes the kernel path.
    """
    hooks: list[Hook] = []
    missing: list[str] = []
    seen: set[int] = set()
    for module in model.modules():
        router = getattr(module, "router", None)
        if router is not None and hasattr(module, "layer_id"):
            layer = int(module.layer_id)
            if getattr(module, "is_monolithic", False):
                sink = getattr(getattr(module, "routed_experts", None), "routing_sink", None)
                if sink is not None and hasattr(sink, "capture_fn"):
                    hook = Hook(layer, sink, "sink", clamp=True, module=module)
                else:
                    missing.append(f"layer {layer}: monolithic MoE kernel (routing inside it)")
                    continue
            elif callable(getattr(router, "set_capture_fn", None)) and hasattr(
                router, "capture_fn"
            ):
                clamp = type(router).__name__ not in SAFE_ROUTERS
                hook = Hook(layer, router, "router", clamp=clamp, module=module)
            else:
                missing.append(f"layer {layer}: {type(router).__name__} has no set_capture_fn")
                continue
        elif (
            hasattr(module, "capture_fn")
            and hasattr(module, "layer_id")
            and not callable(getattr(module, "set_capture_fn", None))
        ):
            hook = Hook(int(module.layer_id), module, "module", clamp=True, module=module)
        else:
            continue
        if hook.layer in seen:
            missing.append(f"layer {hook.layer}: a second MoE block (only the first is counted)")
            continue
        seen.add(hook.layer)
        hooks.append(hook)
    hooks.sort(key=lambda h: h.layer)
    return hooks, missing


def placement(num_experts: int, ep_size: int, strategy: str) -> list[int]:
    """Logical expert -> EP rank without EPLB, as vLLM's determine_expert_map places them."""
    if ep_size <= 1:
        return []
    if strategy == "round_robin":
        return [expert % ep_size for expert in range(num_experts)]
    base, remainder = divmod(num_experts, ep_size)  # "linear": the first ranks take one more
    ranks: list[int] = []
    for rank in range(ep_size):
        ranks += [rank] * (base + (1 if rank < remainder else 0))
    return ranks


# --- the counter ------------------------------------------------------------------------------


@dataclass
class Layout:
    """This worker's place in the parallel layout (what it counts and what the file says)."""

    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    ep_size: int = 1
    sp_size: int = 1  # > 1: sequence-parallel MoE, each TP rank routes its own shard
    pcp_size: int = 1


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
        self._side_stream: Any = None
        self._copied: Any = None

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
        declared = _call_int(model_config, "get_num_experts")
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
        layout = _layout(vllm_config, hooks[0].module)
        if layout.pcp_size > 1:
            warn_once("pcp", "prefill context parallelism is not supported; not counting")
            return None
        if layout.sp_size == 1 and layout.tp_rank != 0:
            log.debug("moe-watch plugin: TP rank %d routes what rank 0 does", layout.tp_rank)
            return None
        moe_config = getattr(hooks[0].module, "moe_config", None)
        top_k = (
            _call_int(model_config, "get_num_experts_per_tok")
            or int(getattr(moe_config, "experts_per_token", 0) or 0)
            or int(getattr(hooks[0].owner, "top_k", 0) or 0)
        )
        # Logical experts: the model's, or the widest layer's (counts are [layer][expert]).
        num_experts = max(declared, *(_logical_experts(hook.module) for hook in hooks))
        if top_k <= 0 or num_experts < top_k:
            warn_once(
                "shape",
                "cannot tell top_k (%s) / experts (%s); not counting",
                top_k,
                num_experts,
            )
            return None
        device = _device_of(hooks[0].module)
        if _traced_platform(device):
            # vLLM calls the MoE layer directly on CPU: torch.compile traces our callback into
            # the model's graph. The DP slicing reads per-step host metadata a trace would
            # freeze, so DP is not counted there; and the compile cache must not hand a graph
            # compiled with the plugin to a server without it, or the other way round.
            if layout.dp_size > 1 or layout.sp_size > 1:
                warn_once("cpu-dp", "data parallelism on a CPU backend is not supported")
                return None
            _mark_compile_cache(vllm_config)
        eplb = bool(getattr(getattr(moe_config, "moe_parallel_config", None), "enable_eplb", False))
        strategy = str(getattr(hooks[0].module, "expert_placement_strategy", "linear"))
        counter = cls(
            hooks,
            device=device,
            top_k=top_k,
            num_experts=num_experts,
            cap_tokens=_cap_tokens(vllm_config),
            layout=layout,
            model=_served_model_name(model_config),
            placement=[] if eplb else placement(num_experts, layout.ep_size, strategy),
            interval=_interval(),
            forward_context=_forward_context_getter()
            if layout.dp_size > 1 or layout.sp_size > 1
            else None,
        )
        counter.bind()
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
        torch = self._torch
        with self.lock:  # not during a step or a warm-up (no copy can overlap a graph capture)
            if self._cuda:
                with torch.cuda.stream(self._side_stream):
                    self._host.copy_(self.accumulator, non_blocking=True)
                    self._copied.record(self._side_stream)
                host = None
            else:
                host = self.accumulator.to("cpu", copy=True)
        if host is None:
            self._copied.synchronize()  # waits for our copy only, outside the lock
            host = self._host
        return host[:, : self.num_experts].tolist()  # type: ignore[no-any-return]

    def snapshot(self) -> CountsFile | None:
        if self.failed:
            return None
        layout = self.layout
        return CountsFile(
            pid=os.getpid(),
            started=self.started,
            updated=time.time(),
            model=self.model,
            top_k=self.top_k,
            num_experts=self.num_experts,
            layers=list(self.layers),
            counts=self.counts(),
            vllm_version=vllm_version(),
            dp_rank=layout.dp_rank,
            tp_rank=layout.tp_rank,
            pp_rank=layout.pp_rank,
            ep_rank=layout.ep_rank,
            ep_size=layout.ep_size,
            sequence_parallel=layout.sp_size > 1,
            placement=list(self.placement),
        )


# --- reading vLLM's configuration, failing soft ------------------------------------------------


def _call_int(obj: Any, method: str) -> int:
    try:
        return int(getattr(obj, method)())
    except Exception:
        return 0


# In vLLM's compile-cache key (additional_config is hashed into VllmConfig.compute_hash).
COMPILE_CACHE_MARK = ("moe_watch_expert_counts", "1")


def _traced_platform(device: Any) -> bool:
    """Whether vLLM calls the MoE layer directly (not its opaque custom op): CPU and TPU."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu() or current_platform.is_tpu())
    except Exception:
        return str(getattr(device, "type", device)) == "cpu"


def _mark_compile_cache(vllm_config: Any) -> None:
    """Key vLLM's torch.compile cache on the plugin being on (our callback is in the graph)."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict):
        key, value = COMPILE_CACHE_MARK
        extra[key] = value
    else:
        warn_once(
            "cache-key",
            "cannot mark the compile cache (additional_config is not a dict)",
        )


def _logical_experts(module: Any) -> int:
    config = getattr(module, "moe_config", None)
    return int(getattr(config, "num_logical_experts", 0) or 0)


def _device_of(module: Any) -> Any:
    for parameter in module.parameters():
        return parameter.device
    config_device = getattr(getattr(module, "moe_config", None), "device", None)
    return config_device if config_device is not None else "cpu"


def _served_model_name(model_config: Any) -> str:
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name or "")


def _cap_tokens(vllm_config: Any) -> int:
    """Token positions the weights cover: a step's tokens on this rank, padding included."""
    scheduled = int(
        getattr(getattr(vllm_config, "scheduler_config", None), "max_num_batched_tokens", 0) or 0
    )
    graphs = int(
        getattr(
            getattr(vllm_config, "compilation_config", None),
            "max_cudagraph_capture_size",
            0,
        )
        or 0
    )
    return 2 * max(scheduled, graphs, 8192) + 64


def _interval() -> float:
    raw = os.environ.get("MOE_WATCH_PLUGIN_INTERVAL_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        value = DEFAULT_INTERVAL_SECONDS
    return max(0.1, value)


def _layout(vllm_config: Any, module: Any) -> Layout:
    layout = Layout()
    parallel = getattr(vllm_config, "parallel_config", None)
    layout.dp_rank = int(getattr(parallel, "data_parallel_rank", 0) or 0)
    layout.dp_size = int(getattr(parallel, "data_parallel_size", 1) or 1)
    try:
        from vllm.distributed import parallel_state as ps

        layout.tp_rank = int(ps.get_tensor_model_parallel_rank())
        layout.pp_rank = int(ps.get_pp_group().rank_in_group)
    except Exception:  # not initialised (a single process) or renamed: rank 0
        log.debug("moe-watch plugin: parallel ranks unavailable", exc_info=True)
    moe_parallel = getattr(getattr(module, "moe_config", None), "moe_parallel_config", None)
    if moe_parallel is not None:
        if getattr(moe_parallel, "use_ep", False):
            layout.ep_rank = int(getattr(moe_parallel, "ep_rank", 0) or 0)
            layout.ep_size = int(getattr(moe_parallel, "ep_size", 1) or 1)
        layout.sp_size = int(getattr(moe_parallel, "sp_size", 1) or 1)
        layout.pcp_size = int(getattr(moe_parallel, "pcp_size", 1) or 1)
    return layout


def _forward_context_getter() -> Callable[[], Any]:
    from vllm.forward_context import get_forward_context

    def context() -> Any:
        try:
            return get_forward_context()
        except Exception:  # no context set: not inside a model step
            return None

    return context
