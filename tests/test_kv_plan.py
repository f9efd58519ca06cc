"""The plan's KV tokens held against what vLLM allocated: the drift rule, vLLM's per-DP-rank
max_num_seqs, the exported series and /status, on the real captures served over HTTP."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from moe_watch.drift import Running, find_drift, running_from, setting_flags
from moe_watch.serving.views import status_document
from moe_watch.sizing.allocated import allocated_from_labels, kv_coverage
from moe_watch.sizing.plan import PlanFile, VllmSettings
from moe_watch.thresholds import DEFAULT
from tests.conftest import EngineStub, read_capture
from tests.test_agent import exposition, value


def cache_labels(state: str = "after-load") -> dict[str, str]:
    for family in text_string_to_metric_families(read_capture(state)):
        if family.name == "vllm:cache_config_info":
            return dict(family.samples[0].labels)
    raise AssertionError("no cache_config_info")


# -- the drift rule ------------------------------------------------------------------------------


def test_an_engine_holding_half_its_plan_drifts_and_says_how_many_sequences_fit() -> None:
    allocated = allocated_from_labels(cache_labels())  # 1,048,576 tokens, 1024 at len 1024
    assert allocated is not None
    coverage = kv_coverage(256, 8192, allocated)  # 2,097,152 tokens planned
    running = Running(model="tiny", max_model_len=1024)
    [drift] = find_drift(running, kv=coverage)
    assert drift.setting == "kv_cache_tokens"
    assert drift.running == "1048576"
    assert drift.expected == f">= {int(0.9 * 2_097_152) + 1}"
    assert "128 sequences of 8192 tokens fit" in drift.rule
    assert "the plan needs 256 per DP rank" in drift.rule
    assert "vLLM: 1024 at its max_model_len 1024" in drift.rule
    assert dict(setting_flags([drift]))["kv_cache_tokens"] is True


def test_the_threshold_decides_and_comes_from_thresholds() -> None:
    allocated = allocated_from_labels(cache_labels())
    assert allocated is not None
    assert DEFAULT.kv_cache_plan_coverage == 0.9
    # 1,048,576 held: a plan of 1,165,084 tokens is 0.9000004 covered, 1,165,085 is just below
    at = kv_coverage(1, 1_165_084, allocated)
    below = kv_coverage(1, 1_165_102, allocated)
    assert at.ratio >= 0.9
    assert not at.short()
    assert below.ratio < 0.9
    assert below.short()
    assert find_drift(Running(), kv=at) == []
    assert [d.setting for d in find_drift(Running(), kv=below)] == ["kv_cache_tokens"]
    assert not below.short(below=0.5)


def test_an_allocation_label_out_of_range_is_refused_and_named() -> None:
    for bad in ("nan", "inf", "-8", "1e400", "9" * 300):
        refused: list[str] = []
        labels = cache_labels() | {"kv_cache_size_tokens": bad}
        assert allocated_from_labels(labels, refused) is None
        assert refused == [f"kv_cache_size_tokens={bad[:32]}"]
    refused = []
    huge = cache_labels() | {"num_gpu_blocks": str(1 << 40), "block_size": str(1 << 20)}
    assert allocated_from_labels(huge, refused) is None
    assert len(refused) == 1
    assert refused[0].startswith("num_gpu_blocks=")
    refused = []
    assert allocated_from_labels(cache_labels() | {"num_gpu_blocks": "None"}, refused) is None
    assert refused == []  # not allocated yet: unknown, not refused


# -- vLLM's max_num_seqs is per DP rank ---------------------------------------------------------


def test_the_static_rule_judges_the_flag_per_dp_rank() -> None:
    serve = ["vllm", "serve", "moonshotai/Kimi-K2-Instruct", "--data-parallel-size", "8",
             "--enable-expert-parallel", "--max-num-seqs", "8"]  # fmt: skip
    running = running_from({}, serve, max_model_len=None, gpus=8)
    assert running.max_num_seqs == 8  # the flag as it is: per rank, 64 in all
    assert find_drift(running) == []
    serve[-1] = "16"
    [drift] = find_drift(running_from({}, serve, max_model_len=None, gpus=8))
    assert (drift.setting, drift.running, drift.expected) == ("max_num_seqs", "16", "<= 8")


def test_a_plans_max_num_seqs_is_compared_per_dp_rank() -> None:
    # The plan's max_num_seqs is its target for the deployment (moe-watch size): 16 over DP 2
    # is vLLM's --max-num-seqs 8 on each rank.
    plan = PlanFile(
        model="mixtral-8x7b",
        gpus=2,
        tensor_parallel_size=1,
        data_parallel_size=2,
        vllm=VllmSettings(max_num_seqs=16, max_model_len=8192),
    )
    assert plan.sized(Path(".")).chosen.seqs_per_rank == 8
    per_rank = Running(model="mixtral-8x7b", max_num_seqs=8, gpus=2, expert_parallel=True)
    assert find_drift(per_rank, plan) == []
    total = Running(model="mixtral-8x7b", max_num_seqs=16, gpus=2, expert_parallel=True)
    [drift] = find_drift(total, plan)
    assert (drift.setting, drift.running, drift.expected) == ("max_num_seqs", "16", "8")
    # the agent passes the sized layout's figure (a picked DP size is not in the file)
    assert find_drift(total, plan, seqs_per_rank=16) == []


# -- the agent: exported, in /status, drifted -------------------------------------------------


async def agent_cycle(tmp_path: Path, plan_text: str | None, body: str | None = None):  # type: ignore[no-untyped-def]
    from moe_watch.agent import Agent
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import FakeNvml

    target: dict[str, str] = {"name": "tiny-0"}
    if plan_text is not None:
        plan = tmp_path / "plan.yaml"
        plan.write_text(plan_text)
        target["plan"] = str(plan)
    stub = await EngineStub(body or read_capture("after-load")).start()
    fake = FakeNvml.with_gpus(1)
    fake.gpus[0].pids = [os.getpid()]  # this test process: not a vLLM command line
    try:
        config = load_settings(None, targets=[target | {"url": stub.url}])
        async with Agent(config, nvml=fake) as agent:
            return await agent.run_cycle()
    finally:
        await stub.stop()


PLAN = "model: mixtral-8x7b\ngpu: h100-80\ngpus: 1\nvllm:\n  max_num_seqs: {seqs}\n  max_model_len: {length}\n"
KV = ("moe_watch_kv_cache_planned_tokens", "moe_watch_kv_cache_allocated_tokens",
      "moe_watch_kv_cache_max_concurrency", "moe_watch_kv_cache_plan_coverage_ratio")  # fmt: skip


async def test_a_covered_plan_is_exported_beside_the_allocation(tmp_path: Path) -> None:
    snap = await agent_cycle(tmp_path, PLAN.format(seqs=8, length=1024))
    m = exposition(snap)
    at = {name: value(m, name, engine="tiny-0") for name in KV}
    assert at == {
        "moe_watch_kv_cache_planned_tokens": 8 * 1024,
        "moe_watch_kv_cache_allocated_tokens": 1_048_576,  # the capture's kv_cache_size_tokens
        "moe_watch_kv_cache_max_concurrency": 1024,
        "moe_watch_kv_cache_plan_coverage_ratio": 128,
    }
    assert value(m, "moe_watch_config_drift", engine="tiny-0", setting="kv_cache_tokens") == 0
    kv = status_document(snap)["kv_plan"]["tiny-0"]
    assert kv["planned_tokens"] == 8192
    assert kv["planned_max_num_seqs_per_rank"] == 8
    assert kv["allocated_tokens"] == 1_048_576
    assert kv["max_concurrency"] == 1024
    assert kv["coverage_ratio"] == 128
    assert kv["sequences_at_planned_len"] == 1024
    assert kv["short"] is False


async def test_a_plan_needing_more_than_the_allocation_drifts(tmp_path: Path) -> None:
    snap = await agent_cycle(tmp_path, PLAN.format(seqs=256, length=8192))
    m = exposition(snap)
    assert value(m, "moe_watch_kv_cache_plan_coverage_ratio", engine="tiny-0") == 0.5
    assert value(m, "moe_watch_config_drift", engine="tiny-0", setting="kv_cache_tokens") == 1
    [info] = [labels for name, labels in m if name == "moe_watch_config_drift_info"
              and ("setting", "kv_cache_tokens") in labels]  # fmt: skip
    assert "128 sequences of 8192 tokens fit" in dict(info)["rule"]
    drifts = status_document(snap)["drift"]["tiny-0"]
    assert [d["setting"] for d in drifts if d["setting"] == "kv_cache_tokens"] == [
        "kv_cache_tokens"
    ]
    assert status_document(snap)["kv_plan"]["tiny-0"]["short"] is True


async def test_only_what_is_known_is_exported(tmp_path: Path) -> None:
    # No plan: the allocation only. A plan without max_model_len: no planned tokens either.
    for plan_text in (None, "model: mixtral-8x7b\ngpus: 1\nvllm:\n  max_num_seqs: 8\n"):
        m = exposition(await agent_cycle(tmp_path, plan_text))
        present = {name for name, labels in m if name in KV}
        assert present == {"moe_watch_kv_cache_allocated_tokens",
                           "moe_watch_kv_cache_max_concurrency"}  # fmt: skip
        assert value(m, "moe_watch_config_drift", engine="tiny-0", setting="kv_cache_tokens") == 0


async def test_a_hostile_allocation_label_is_counted_and_leaves_the_rest(tmp_path: Path) -> None:
    body = read_capture("after-load").replace(
        'kv_cache_size_tokens="1048576"', 'kv_cache_size_tokens="1e400"'
    )
    assert "1e400" in body
    snap = await agent_cycle(tmp_path, PLAN.format(seqs=8, length=1024), body)
    m = exposition(snap)
    present = {name for name, labels in m if name in KV}
    assert present == {"moe_watch_kv_cache_planned_tokens"}
    assert (
        value(m, "moe_watch_collect_errors_total", source="engine:tiny-0", reason="bad_value") == 1
    )
    assert value(m, "moe_watch_target_up", engine="tiny-0") == 1
    assert value(
        m, "moe_watch_config_drift", engine="tiny-0", setting="gpu_memory_utilization"
    ) in (0, 1)
