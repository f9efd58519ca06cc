"""Checks of the plugin's counter with real torch tensors and stand-in vLLM objects.

Run by tests/test_vllm_plugin.py with an interpreter that has torch (the cached vLLM venv)::

    python tests/vllm_plugin_checks.py OUT_JSON [CHECK ...]

Writes {check name: "ok" | traceback} to OUT_JSON. Stand-ins mirror what vLLM 0.32 has: a
router with ``capture_fn``/``set_capture_fn``, an ``nn.Module`` with ``router``, ``layer_id`` and
``moe_config``, a worker with ``model_runner``/``vllm_config``, a forward context with
``dp_metadata``. The real-vLLM integration test checks the same code against vLLM itself.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from moe_watch.expert_file import read_counts_file
from moe_watch.vllm_plugin import config_readers, logs
from moe_watch.vllm_plugin.config_readers import Layout
from moe_watch.vllm_plugin.counter import ExpertCounter
from moe_watch.vllm_plugin.hooks import Hook, find_hooks
from moe_watch.vllm_plugin.worker import patch_worker_class

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


class FusedTopKRouter:  # a "safe" router: ids are always in range
    def __init__(self, top_k: int = 2) -> None:
        self.top_k = top_k
        self.capture_fn: Callable[[Any], None] | None = None

    def set_capture_fn(self, fn: Callable[[Any], None] | None) -> None:
        self.capture_fn = fn

    def route(self, ids: torch.Tensor) -> None:  # what BaseRouter._select_experts does
        if self.capture_fn is not None:
            self.capture_fn(ids)


class ZeroExpertRouter(FusedTopKRouter):  # not in the safe list: ids get clamped
    pass


class MoEBlock(torch.nn.Module):
    def __init__(self, layer: int, router: FusedTopKRouter, experts: int = 4, **parallel: Any):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.router = router
        self.layer_id = layer
        moe_parallel = SimpleNamespace(
            use_ep=parallel.get("ep_size", 1) > 1,
            ep_rank=parallel.get("ep_rank", 0),
            ep_size=parallel.get("ep_size", 1),
            sp_size=parallel.get("sp_size", 1),
            pcp_size=1,
            enable_eplb=False,
        )
        self.moe_config = SimpleNamespace(
            num_logical_experts=experts,
            experts_per_token=router.top_k,
            moe_parallel_config=moe_parallel,
        )
        self.expert_placement_strategy = parallel.get("strategy", "linear")


def make_counter(
    layers: int = 2,
    experts: int = 4,
    top_k: int = 2,
    layout: Layout | None = None,
    bind: bool = True,
    **kwargs: Any,
) -> tuple[ExpertCounter, list[FusedTopKRouter]]:
    router_cls = kwargs.pop("router_cls", FusedTopKRouter)
    routers = [router_cls(top_k) for _ in range(layers)]
    hooks = [
        Hook(i, r, "router", clamp=router_cls is not FusedTopKRouter) for i, r in enumerate(routers)
    ]
    counter = ExpertCounter(
        hooks,
        device="cpu",
        top_k=top_k,
        num_experts=experts,
        cap_tokens=kwargs.pop("cap_tokens", 64),
        layout=layout or Layout(),
        path=Path(tempfile.mkdtemp()) / "w.experts.json",
        **kwargs,
    )
    if bind:
        counter.bind()
    return counter, routers


def ids(rows: list[list[int]], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def counts(counter: ExpertCounter) -> list[list[int]]:
    return counter.counts()


@check
def warm_up_and_unweighted_steps_add_nothing() -> None:
    counter, routers = make_counter()
    routers[0].route(ids([[0, 1], [2, 3]]))  # profiling / compile / graph capture: limit 0
    assert counts(counter) == [[0] * 4, [0] * 4], counts(counter)


@check
def a_step_counts_each_token_top_k_times_and_padding_not_at_all() -> None:
    counter, routers = make_counter()
    counter.set_limit(3)  # 3 real tokens; the batch is padded to 4 (a CUDA-graph size)
    batch = ids([[0, 1], [0, 2], [3, 0], [1, 1]])
    routers[0].route(batch)
    routers[1].route(batch)
    assert counts(counter) == [[3, 1, 1, 1], [3, 1, 1, 1]], counts(counter)
    counter.set_limit(1)  # a smaller step: the weights shrink
    routers[0].route(batch)
    assert counts(counter)[0] == [4, 2, 1, 1], counts(counter)
    counter.set_limit(0)  # a DP dummy batch
    routers[0].route(batch)
    assert counts(counter)[0] == [4, 2, 1, 1]
    assert int(counter.weights.sum()) == 0


@check
def int64_and_int16_ids_and_non_contiguous_ids_count_the_same() -> None:
    counter, routers = make_counter(router_cls=ZeroExpertRouter)
    counter.set_limit(2)
    routers[0].route(ids([[0, 1], [1, 3]], torch.int64))
    routers[1].route(ids([[0, 1], [1, 3]], torch.int16))
    wide = ids([[0, 9, 1], [1, 9, 3]])[:, [0, 2]]  # a non-contiguous view
    routers[1].route(wide)
    assert counts(counter) == [[1, 2, 0, 1], [2, 4, 0, 2]], counts(counter)


@check
def out_of_range_ids_are_clamped_away_not_fatal() -> None:
    counter, routers = make_counter(router_cls=ZeroExpertRouter)
    counter.set_limit(2)
    routers[0].route(ids([[0, 4], [7, 2]]))  # 4 and 7: "zero experts" beyond the 4 logical ones
    assert counts(counter)[0] == [1, 0, 1, 0], counts(counter)
    assert int(counter.accumulator[0, 4]) == 2  # the overflow column, never published
    assert not counter.failed


@check
def extra_id_columns_beyond_top_k_are_ignored() -> None:
    counter, routers = make_counter(router_cls=ZeroExpertRouter)
    counter.set_limit(2)
    routers[0].route(ids([[0, 1, 3], [2, 1, 3]]))  # a fused shared expert as a third column
    assert counts(counter)[0] == [1, 2, 1, 0], counts(counter)


@check
def chains_to_a_capture_function_already_set_and_binds_once() -> None:
    counter, (router,) = make_counter(layers=1, cap_tokens=8, bind=False)
    seen: list[torch.Tensor] = []
    router.set_capture_fn(seen.append)  # e.g. vLLM's --enable-return-routed-experts capturer
    counter.bind()
    counter.bind()  # idempotent: not wrapped twice
    counter.set_limit(1)
    batch = ids([[2, 3]])
    router.route(batch)
    assert len(seen) == 1
    assert seen[0] is batch
    assert counts(counter) == [[0, 0, 1, 1]]
    # vLLM binds its capturer later (KV-cache setup) and replaces ours: re-binding chains again.
    later: list[torch.Tensor] = []
    router.set_capture_fn(later.append)
    counter.bind()
    router.route(batch)
    assert len(later) == 1
    assert counts(counter) == [[0, 0, 2, 2]]


@check
def a_failure_inside_a_step_stops_counting_but_not_the_chain() -> None:
    counter, (router,) = make_counter(layers=1, cap_tokens=8, bind=False)
    seen: list[torch.Tensor] = []
    router.set_capture_fn(seen.append)
    counter.bind()
    counter.set_limit(1)
    router.route(ids([[1]]))  # one column for top-2: cannot be counted
    assert counter.failed
    assert len(seen) == 1
    router.route(ids([[1, 2]]))  # later steps: not counted, still chained, no exception
    assert len(seen) == 2
    assert counter.snapshot() is None


@check
def a_publisher_that_cannot_start_stops_counting_without_raising_into_vllm() -> None:
    counter, routers = make_counter()

    def refuse() -> None:
        raise RuntimeError("can't start new thread")

    counter.publisher.start = refuse  # type: ignore[method-assign]
    counter.warm_up_begins()
    counter.warm_up_ends(succeeded=True)  # inside vLLM's compile_or_warm_up_model: no raise
    assert counter.failed
    assert not counter.counting
    counter.begin_step(SimpleNamespace(total_num_scheduled_tokens=2))  # no raise, no retry
    routers[0].route(ids([[0, 1], [2, 3]]))
    assert counter.limit == 0
    assert counter.snapshot() is None


@check
def more_tokens_than_the_weights_cover_count_the_covered_ones() -> None:
    counter, routers = make_counter(cap_tokens=2)
    counter.set_limit(5)  # clipped to 2
    routers[0].route(ids([[0, 1]] * 5))
    assert counts(counter)[0] == [2, 2, 0, 0], counts(counter)


def dp_counter(
    tokens: list[int], dp_rank: int, local_sizes: list[int] | None = None, **layout: int
) -> tuple[ExpertCounter, list[FusedTopKRouter], SimpleNamespace]:
    metadata = SimpleNamespace(
        num_tokens_across_dp_cpu=torch.tensor(tokens, dtype=torch.int32),
        local_sizes=local_sizes,
    )
    context = SimpleNamespace(dp_metadata=metadata)
    counter, routers = make_counter(
        layers=1,
        layout=Layout(dp_rank=dp_rank, dp_size=len(tokens), **layout),
        forward_context=lambda: context,
    )
    return counter, routers, metadata


@check
def naive_dp_dispatch_counts_only_this_ranks_rows() -> None:
    # DP ranks route 3 and 2 tokens; the router sees all 5 (gathered); this is rank 1.
    counter, routers, _ = dp_counter([3, 2], dp_rank=1)
    counter.set_limit(2)
    routers[0].route(ids([[0, 0], [0, 0], [0, 0], [1, 2], [3, 1]]))
    assert counts(counter) == [[0, 2, 1, 1]], counts(counter)


@check
def dp_with_local_routing_counts_all_rows() -> None:
    counter, routers, _ = dp_counter([3, 2], dp_rank=1)
    counter.set_limit(2)
    routers[0].route(ids([[1, 2], [3, 1]]))
    assert counts(counter) == [[0, 2, 1, 1]], counts(counter)


@check
def sequence_parallel_shard_counts_its_real_tokens() -> None:
    # DP rank 0 has 5 tokens, split over 2 TP ranks in shards of 3; TP rank 1 holds positions
    # 3, 4 and one padding row.
    counter, routers, _ = dp_counter([5, 4], dp_rank=0, tp_rank=1, sp_size=2)
    counter.set_limit(5)
    routers[0].route(ids([[1, 2], [1, 3], [0, 0]]))
    assert counts(counter) == [[0, 2, 1, 1]], counts(counter)


@check
def sequence_parallel_gathered_shards_count_only_this_shard() -> None:
    # Shards of [5, 3] tokens over sp 2: sizes [3, 3, 2, 2]; DP rank 1, TP rank 1 -> rows 8, 9.
    counter, routers, _ = dp_counter(
        [5, 3], dp_rank=1, tp_rank=1, sp_size=2, local_sizes=[3, 3, 2, 2]
    )
    counter.set_limit(3)  # DP rank 1's 3 tokens: positions 0-2; this shard holds 2 and 3 (pad)
    rows = [[0, 0]] * 8 + [[2, 3], [1, 1]]
    routers[0].route(ids(rows))
    assert counts(counter) == [[0, 0, 1, 1]], counts(counter)


@check
def an_unexpected_dp_layout_is_skipped_with_one_warning() -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logs.log.addHandler(handler)
    logs._warned.discard("layout")
    try:
        counter, routers, _ = dp_counter([3, 2], dp_rank=1)
        counter.set_limit(2)
        routers[0].route(ids([[0, 1]] * 7))
        routers[0].route(ids([[0, 1]] * 7))
    finally:
        logs.log.removeHandler(handler)
    assert counts(counter) == [[0, 0, 0, 0]]
    assert not counter.failed
    layout_warnings = [r for r in records if "DP layout" in r.getMessage()]
    assert len(layout_warnings) == 1, [r.getMessage() for r in records]
    assert "vLLM" in layout_warnings[0].getMessage()


@check
def a_compiled_caller_counts_every_batch_size_from_one_trace() -> None:
    # vLLM's CPU path calls the MoE layer (and so the router hook) inside the compiled graph,
    # traced once with fullgraph: the callback must trace without breaks and stay right for
    # batch sizes other than the traced one.
    for router_cls in (FusedTopKRouter, ZeroExpertRouter):
        counter, routers = make_counter(layers=1, router_cls=router_cls, cap_tokens=64)
        router = routers[0]

        def forward(topk_ids: torch.Tensor, router: FusedTopKRouter = router) -> torch.Tensor:
            router.capture_fn(topk_ids)  # type: ignore[misc]
            return topk_ids.sum()

        torch._dynamo.reset()
        compiled = torch.compile(forward, fullgraph=True, dynamic=True, backend="aot_eager")
        counter.set_limit(0)
        compiled(ids([[0, 1]] * 16))  # the warm-up trace: nothing counted
        counter.set_limit(3)
        compiled(ids([[0, 1], [2, 3], [0, 3], [1, 1]]))  # 3 tokens padded to 4
        counter.set_limit(9)
        compiled(ids([[3, 2]] * 9 + [[0, 0]] * 3))
        assert counts(counter) == [[2, 1, 10, 11]], (
            router_cls.__name__,
            counts(counter),
        )


@check
def find_hooks_reads_moe_blocks_in_layer_order_and_explains_the_rest() -> None:
    class Monolithic(MoEBlock):
        is_monolithic = True

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = object()  # no capture hook
            self.layer_id = 7

    model = torch.nn.ModuleList(
        [
            MoEBlock(3, FusedTopKRouter()),
            MoEBlock(1, ZeroExpertRouter()),
            Monolithic(5, FusedTopKRouter()),
            Plain(),
        ]
    )
    hooks, missing = find_hooks(model)
    assert [(h.layer, h.kind, h.clamp) for h in hooks] == [
        (1, "router", True),
        (3, "router", False),
    ]
    assert any("layer 5: monolithic" in m for m in missing), missing
    assert any("layer 7: object has no set_capture_fn" in m for m in missing), missing


class FakeRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def get_model(self) -> torch.nn.Module:
        return self.model


def fake_vllm_config(experts: int = 4, top_k: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(
            served_model_name="tiny",
            model="/models/tiny",
            get_num_experts=lambda: experts,
            get_num_experts_per_tok=lambda: top_k,
        ),
        parallel_config=SimpleNamespace(data_parallel_rank=0, data_parallel_size=1),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=16),
        additional_config={},
        compilation_config=SimpleNamespace(max_cudagraph_capture_size=8),
    )


@check
def the_worker_lifecycle_counts_real_steps_only_and_publishes() -> None:
    class Worker:  # the shape of vllm.v1.worker.gpu_worker.Worker
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model
            self.vllm_config = fake_vllm_config()

        def load_model(self) -> None:
            self.model_runner = FakeRunner(self.model)

        def forward(self, rows: int) -> None:
            for block in self.model:
                block.router.route(ids([[block.layer_id % 4, 3]] * rows))

        def compile_or_warm_up_model(self) -> str:
            self.forward(8)  # compile / CUDA-graph capture sizes
            self.execute_model(SimpleNamespace(total_num_scheduled_tokens=4))  # V2 JIT warm-up
            return "warm"

        def execute_model(self, scheduler_output: Any) -> int:
            self.forward(8)  # padded to a graph size
            return int(scheduler_output.total_num_scheduled_tokens)

        def execute_dummy_batch(self) -> None:
            self.forward(1)

    assert patch_worker_class(Worker) == [
        "load_model",
        "compile_or_warm_up_model",
        "execute_model",
        "execute_dummy_batch",
    ]
    assert patch_worker_class(Worker) == []  # once
    directory = Path(tempfile.mkdtemp())
    import os

    os.environ["MOE_WATCH_EXPERTS_DIR"] = str(directory)
    os.environ["MOE_WATCH_PLUGIN_INTERVAL_SECONDS"] = "0.1"
    worker = Worker(
        torch.nn.ModuleList([MoEBlock(0, FusedTopKRouter()), MoEBlock(1, FusedTopKRouter())])
    )
    worker.load_model()
    counter = worker.__dict__["_moe_watch_counter"]
    assert (counter.layers, counter.model) == ([0, 1], "tiny")
    assert counter.cap_tokens >= 16
    # On CPU the callback is traced into vLLM's compiled graph: the compile cache is keyed on it.
    assert worker.vllm_config.additional_config == {"moe_watch_expert_counts": "1"}
    worker.forward(8)  # the profiling run
    assert worker.compile_or_warm_up_model() == "warm"
    assert counter.counting
    assert counts(counter) == [[0] * 4, [0] * 4]
    assert worker.execute_model(SimpleNamespace(total_num_scheduled_tokens=5)) == 5
    worker.execute_dummy_batch()
    worker.execute_model(SimpleNamespace(total_num_scheduled_tokens=2))
    assert counts(counter) == [[7, 0, 0, 7], [0, 7, 0, 7]], counts(counter)
    deadline = time.monotonic() + 30
    while True:  # the publisher thread writes every 0.1 s
        files = [p for p in directory.glob("*.experts.json") if not p.name.startswith(".tmp-")]
        if files and read_counts_file(files[0]).counts == [[7, 0, 0, 7], [0, 7, 0, 7]]:
            break
        assert time.monotonic() < deadline, "the publisher did not write the counts"
        time.sleep(0.05)
    data = read_counts_file(files[0])
    assert (data.model, data.top_k, data.num_experts, data.layers) == (
        "tiny",
        2,
        4,
        [0, 1],
    )
    # One step in 4 is measured: the first real one (5 tokens, bin 4), not the V2 warm-up step
    # and not the dummy batch; each layer's 5 tokens reached its two experts.
    assert data.coverage is not None
    assert data.coverage.sample_every == 4
    assert (data.coverage.steps[2], data.coverage.tokens[2]) == (1, 5), data.coverage
    assert data.coverage.distinct[2] == [2, 2], data.coverage
    assert sum(data.coverage.steps) == 1, data.coverage
    assert data.started >= time.time() - 60
    assert data.pid == os.getpid()
    counter.publisher.close()  # what atexit does
    assert not files[0].exists()


@check
def a_dense_model_or_tp_rank_1_does_not_count() -> None:
    worker = SimpleNamespace(
        model_runner=FakeRunner(torch.nn.Linear(2, 2)),
        vllm_config=fake_vllm_config(experts=0),
    )
    assert ExpertCounter.attach(worker) is None
    original, traced = config_readers.layout, config_readers.traced_platform
    config_readers.layout = lambda config, module: Layout(tp_rank=1)  # type: ignore[assignment]
    config_readers.traced_platform = lambda device: False  # type: ignore[assignment]  # a GPU
    try:
        worker = SimpleNamespace(
            model_runner=FakeRunner(torch.nn.ModuleList([MoEBlock(0, FusedTopKRouter())])),
            vllm_config=fake_vllm_config(),
        )
        assert ExpertCounter.attach(worker) is None  # routes what TP rank 0 routes
        config_readers.layout = lambda config, module: Layout(tp_rank=1, sp_size=2)  # type: ignore[assignment]
        assert ExpertCounter.attach(worker) is not None  # sequence parallel: its own shard
    finally:
        config_readers.layout, config_readers.traced_platform = original, traced


@check
def placement_follows_vllms_expert_map() -> None:
    model = torch.nn.ModuleList([MoEBlock(0, FusedTopKRouter(), experts=6, ep_size=2, ep_rank=1)])
    worker = SimpleNamespace(
        model_runner=FakeRunner(model), vllm_config=fake_vllm_config(experts=6)
    )
    counter = ExpertCounter.attach(worker)
    assert counter is not None
    assert counter.placement == [0, 0, 0, 1, 1, 1]
    assert (counter.layout.ep_rank, counter.layout.ep_size) == (1, 2)


# --- expert coverage per step --------------------------------------------------------------------


def coverage_counter(every: int = 1, **kwargs: Any) -> tuple[ExpertCounter, list[FusedTopKRouter]]:
    counter, routers = make_counter(**kwargs)
    assert counter.coverage is not None
    counter.coverage.every = every
    counter.counting = True  # as after warm-up, without starting the publisher thread
    return counter, routers


def step(
    counter: ExpertCounter,
    routers: list[FusedTopKRouter],
    tokens: int,
    rows: list[list[list[int]]],
    *,
    completed: bool = True,
) -> None:
    """One real step of ``tokens`` scheduled tokens; ``rows[i]``: what layer i routes."""
    counter.begin_step(SimpleNamespace(total_num_scheduled_tokens=tokens))
    for router, layer_rows in zip(routers, rows, strict=True):
        if layer_rows:
            router.route(ids(layer_rows))
    counter.end_step(completed=completed)


def coverage_of(counter: ExpertCounter) -> Any:
    _, coverage = counter.copy_out()
    assert coverage is not None
    return coverage


@check
def coverage_counts_the_experts_each_layer_reached_in_the_steps_bin() -> None:
    counter, routers = coverage_counter()
    # 3 real tokens padded to 4 rows: layer 0 reaches experts 0-3, layer 1 only 0 and 1; the
    # padding row (expert 1, 1) adds nothing new, and its weight is 0 anyway.
    step(counter, routers, 3, [[[0, 1], [0, 2], [3, 0], [1, 1]], [[0, 1]] * 4])
    step(counter, routers, 1, [[[2, 3]], [[1, 2]]])
    coverage = coverage_of(counter)
    assert coverage.bins == [2**b for b in range(12)]
    assert (coverage.steps[2], coverage.tokens[2], coverage.distinct[2]) == (1, 3, [4, 2])
    assert (coverage.steps[0], coverage.tokens[0], coverage.distinct[0]) == (1, 1, [2, 2])
    assert sum(coverage.steps) == 2
    assert counts(counter) == [[3, 1, 2, 2], [3, 4, 1, 0]], counts(counter)  # unchanged


@check
def coverage_samples_one_step_in_n_and_skips_failed_and_empty_steps() -> None:
    counter, routers = coverage_counter(every=4)
    for _ in range(8):  # steps 1 and 5 are sampled
        step(counter, routers, 2, [[[0, 1], [2, 3]], [[0, 1], [0, 1]]])
    coverage = coverage_of(counter)
    assert (coverage.steps[1], coverage.tokens[1], coverage.distinct[1]) == (2, 4, [8, 4])
    assert coverage.sample_every == 4
    counter.coverage.every = 1
    step(counter, routers, 2, [[[0, 1], [2, 3]], [[0, 1], [0, 1]]], completed=False)
    step(counter, routers, 0, [[], []])  # nothing scheduled (an idle step): not a sample
    assert coverage_of(counter).steps[1] == 2
    step(counter, routers, 2, [[[3, 1], [3, 1]], [[2, 1], [2, 1]]])
    assert coverage_of(counter).distinct[1] == [10, 6]


@check
def coverage_through_a_compiled_caller_is_the_steps_increase() -> None:
    counter, routers = coverage_counter(layers=1)
    router = routers[0]

    def forward(topk_ids: torch.Tensor) -> torch.Tensor:
        router.capture_fn(topk_ids)  # type: ignore[misc]
        return topk_ids.sum()

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, dynamic=True, backend="aot_eager")
    for tokens, rows in ((3, [[0, 1], [0, 1], [0, 3], [2, 2]]), (9, [[3, 2]] * 9 + [[0, 1]] * 3)):
        counter.begin_step(SimpleNamespace(total_num_scheduled_tokens=tokens))
        compiled(ids(rows))
        counter.end_step()
    coverage = coverage_of(counter)
    assert (coverage.steps[2], coverage.distinct[2]) == (1, [3]), coverage  # 3 tokens: 0, 1, 3
    assert (coverage.steps[3], coverage.distinct[3]) == (1, [2]), coverage  # 9 tokens: 2, 3


@check
def a_fault_in_coverage_turns_it_off_and_counting_goes_on() -> None:
    counter, routers = coverage_counter()
    assert counter.coverage is not None

    def broken(completed: bool) -> None:
        raise RuntimeError("boom")

    counter.coverage.step_ends = broken  # type: ignore[method-assign]
    step(counter, routers, 1, [[[0, 1]], [[0, 1]]])
    assert counter.coverage is None
    assert not counter.failed
    step(counter, routers, 1, [[[0, 1]], [[0, 1]]])
    assert counts(counter) == [[2, 2, 0, 0], [2, 2, 0, 0]], counts(counter)
    data = counter.snapshot()
    assert data is not None
    assert data.coverage is None


@check
def sequence_parallel_workers_do_not_measure_coverage() -> None:
    counter, _ = make_counter(layout=Layout(tp_rank=1, sp_size=2, dp_size=2))
    assert counter.coverage is None
    assert counter.copy_out()[1] is None


# --- all-to-all timing -----------------------------------------------------------------------

DELAY = 0.02  # an injected delay inside the timed exchange


class StandInManager:  # the shape of vLLM's AgRsAll2AllManager: dispatch/combine on the EP group
    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self.calls = 0

    def dispatch_router_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> Any:
        self.calls += 1
        time.sleep(self.delay)  # the injected delay (inside the timed region)
        return hidden, logits

    def combine(self, hidden: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return hidden * 1


class DeepEPLLPrepareAndFinalize:  # a timed prepare/finalize: async, and one that calls the manager
    def __init__(self, manager: StandInManager) -> None:
        self.manager = manager
        self.received = 0

    def prepare(self, hidden: torch.Tensor) -> Any:
        return self.manager.dispatch_router_logits(hidden, hidden)  # nested: counted once

    def prepare_async(self, hidden: torch.Tensor) -> Any:
        def hook() -> None:
            time.sleep(DELAY)  # the send/receive the hook waits for

        def receiver() -> torch.Tensor:
            self.received += 1
            return hidden

        return hook, receiver

    def finalize(self, out: torch.Tensor) -> None:
        out.add_(1)


class SomeFuturePrepareAndFinalize(DeepEPLLPrepareAndFinalize):
    pass


def a2a_timer(**kwargs: Any) -> Any:
    from moe_watch.vllm_plugin.all2all import All2AllTimer

    return All2AllTimer("cpu", backend="allgather_reducescatter", **kwargs)


@check
def all2all_time_is_summed_per_forward_pass_and_only_in_real_steps() -> None:
    timer = a2a_timer()
    manager = StandInManager()
    assert timer.wrap_manager(manager)
    x = torch.ones(2, 2)
    manager.dispatch_router_logits(x, x)  # outside a step (warm-up, profiling): not timed
    assert timer.count == 0
    for _ in range(2):  # two forward passes of 3 MoE layers
        timer.step_begins()
        for _layer in range(3):
            manager.dispatch_router_logits(x, x)
            manager.combine(x)
        timer.step_ends()
    field = timer.file_field()
    assert field["count"] == 2, field
    assert field["exchanges"] == 12, field
    per_pass = field["sum"] / field["count"]
    assert 3 * DELAY <= per_pass < 3 * DELAY + 0.5, per_pass  # never below the injected delay
    assert field["method"] == "perf_counter"
    assert field["backend"] == "allgather_reducescatter"
    assert sum(field["buckets"]) == 2
    assert manager.calls == 13  # every call reached vLLM's method
    assert timer.wrap_manager(manager)
    assert manager.calls == 13
    timer.step_begins()
    manager.dispatch_router_logits(x, x)
    timer.step_ends()
    assert timer.count == 3
    assert timer.exchanges == 13


@check
def a_nested_exchange_counts_once_and_async_ends_at_the_receiver() -> None:
    timer = a2a_timer()
    manager = StandInManager()
    pf = DeepEPLLPrepareAndFinalize(manager)
    timer.wrap_manager(manager)
    assert timer.wrap_prepare_finalize(pf)
    assert timer.wrap_prepare_finalize(pf)  # once
    x = torch.zeros(2)
    timer.step_begins()
    pf.prepare(x)  # prepare -> manager.dispatch: one interval
    hook, receiver = pf.prepare_async(x)
    hook()  # vLLM runs the hook (or shared experts) before the receiver
    assert receiver() is x
    assert pf.received == 1
    pf.finalize(x)
    timer.step_ends()
    assert x.tolist() == [1.0, 1.0]
    assert (timer.count, timer.exchanges) == (1, 3), (timer.count, timer.exchanges)
    assert 2 * DELAY <= timer.sum < 2 * DELAY + 0.5, timer.sum


@check
def an_unknown_backend_is_not_timed_and_still_works() -> None:
    timer = a2a_timer()
    pf = SomeFuturePrepareAndFinalize(StandInManager(delay=0))
    prepare = pf.prepare
    assert not timer.wrap_prepare_finalize(pf)
    assert pf.prepare == prepare  # untouched
    assert "SomeFuturePrepareAndFinalize" in "".join(logs._warned)


@check
def a_failing_exchange_raises_as_before_and_timing_goes_on() -> None:
    timer = a2a_timer()

    class Broken(StandInManager):
        def combine(self, hidden: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("peer gone")

    manager = Broken(delay=0)
    timer.wrap_manager(manager)
    timer.step_begins()
    try:
        manager.combine(torch.zeros(1))
    except RuntimeError as exc:
        assert str(exc) == "peer gone"  # noqa: PT017 (no pytest in this script)
    else:
        raise AssertionError("vLLM's exception was swallowed")
    timer.step_ends()
    timer.step_begins()
    manager.dispatch_router_logits(torch.zeros(1), torch.zeros(1))
    timer.step_ends()
    assert (timer.count, timer.failed) == (2, False)


@check
def a_fault_in_the_timing_code_turns_timing_off_not_serving() -> None:
    from moe_watch.vllm_plugin import all2all

    timer = a2a_timer()
    manager = StandInManager(delay=0)
    timer.wrap_manager(manager)
    original = all2all.time.perf_counter
    all2all.time.perf_counter = None  # type: ignore[assignment]
    try:
        timer.step_begins()
        out = manager.combine(torch.ones(1))
        timer.step_ends()
    finally:
        all2all.time.perf_counter = original
    assert out.tolist() == [1.0]
    assert manager.calls == 1
    assert timer.failed
    assert timer.file_field() is None
    manager.combine(torch.ones(1))  # still vLLM's method, untimed
    assert manager.calls == 2


class FakeCudaEvent:  # torch.cuda.Event's surface: record, query, elapsed_time (ms)
    clock = 0.0
    completed_up_to = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at: float | None = None

    def record(self) -> None:
        FakeCudaEvent.clock += 7.5  # the GPU spends 7.5 ms between two records
        self.at = FakeCudaEvent.clock

    def query(self) -> bool:
        return self.at is not None and self.at <= FakeCudaEvent.completed_up_to

    def elapsed_time(self, end: FakeCudaEvent) -> float:
        assert self.query(), "elapsed_time on an incomplete event"
        assert end.query(), "elapsed_time on an incomplete event"
        assert end.at is not None
        assert self.at is not None
        return end.at - self.at

    def synchronize(self) -> None:
        raise AssertionError("a host sync")


@check
def cuda_events_are_read_only_once_complete_and_never_synchronized() -> None:
    timer = a2a_timer(every=2)
    cuda = SimpleNamespace(
        Event=FakeCudaEvent, is_current_stream_capturing=lambda: capturing[0], synchronize=None
    )
    capturing = [False]
    timer._torch = SimpleNamespace(cuda=cuda, compiler=torch.compiler)
    timer.cuda, timer.method = True, "cuda_events"
    manager = StandInManager(delay=0)
    timer.wrap_manager(manager)
    x = torch.zeros(1)
    for step in range(4):  # steps 0 and 2 are sampled (one in 2)
        timer.step_begins()
        capturing[0] = step == 2  # a CUDA-graph capture: not timed
        manager.dispatch_router_logits(x, x)
        manager.combine(x)
        timer.step_ends()
    capturing[0] = False
    assert timer.file_field()["count"] == 0  # the GPU has not reached the events yet
    FakeCudaEvent.completed_up_to = FakeCudaEvent.clock
    field = timer.file_field()
    assert (field["count"], field["exchanges"]) == (1, 2), field
    assert abs(field["sum"] - 2 * 7.5 / 1000) < 1e-9, field
    assert field["method"] == "cuda_events"
    assert field["sample_every"] == 2
    assert len(timer._free_events) == 4  # recycled


@check
def a_compiled_caller_traces_through_the_timed_exchange() -> None:
    timer = a2a_timer()

    class Manager:
        def combine(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden * 2

    manager = Manager()
    timer.wrap_manager(manager)

    def layer(x: torch.Tensor) -> torch.Tensor:
        return manager.combine(x + 1)

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    timer.step_begins()
    assert compiled(torch.ones(3)).tolist() == [4.0, 4.0, 4.0]
    timer.step_ends()
    assert timer.count == 0
    assert not timer.failed


@check
def the_worker_times_the_ep_exchange_and_publishes_it() -> None:
    from moe_watch.vllm_plugin import all2all

    manager = StandInManager()
    original_manager, original_layout = all2all.all2all_manager, config_readers.layout
    all2all.all2all_manager = lambda: manager  # type: ignore[assignment]
    config_readers.layout = lambda config, module: Layout(ep_rank=1, ep_size=2)  # type: ignore[assignment]
    try:
        model = torch.nn.ModuleList([MoEBlock(0, FusedTopKRouter(), ep_size=2, ep_rank=1)])
        config = fake_vllm_config()
        config.parallel_config.all2all_backend = "allgather_reducescatter"
        worker = SimpleNamespace(model_runner=FakeRunner(model), vllm_config=config)
        counter = ExpertCounter.attach(worker)
    finally:
        all2all.all2all_manager, config_readers.layout = original_manager, original_layout
    assert counter is not None
    assert counter.all2all is not None
    counter.start_counting()
    try:
        x = torch.zeros(1)
        counter.begin_step(SimpleNamespace(total_num_scheduled_tokens=1))
        manager.dispatch_router_logits(x, x)
        manager.combine(x)
        counter.end_step()
        data = counter.snapshot()
        assert data is not None
        assert data.all2all is not None
        assert data.all2all.count == 1
        assert data.all2all.backend == "allgather_reducescatter"
        assert DELAY <= data.all2all.sum < DELAY + 0.5
    finally:
        counter.publisher.close()
    # Without expert parallelism there is no exchange to time.
    worker = SimpleNamespace(
        model_runner=FakeRunner(torch.nn.ModuleList([MoEBlock(0, FusedTopKRouter())])),
        vllm_config=fake_vllm_config(),
    )
    plain = ExpertCounter.attach(worker)
    assert plain is not None
    assert plain.all2all is None
    assert plain.snapshot().all2all is None


def main(argv: list[str]) -> int:
    out = Path(argv[1])
    names = argv[2:] or list(CHECKS)
    results = {}
    for name in names:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
