"""Drift: one test per rule, on command lines and cache_config_info shaped like real ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moe_watch.drift import (
    MEASURED_KNEE,
    SETTINGS,
    STATIC_RULE,
    Drift,
    Running,
    find_drift,
    max_num_seqs_rule,
    running_from,
    setting_flags,
)
from moe_watch.serving.views import status_document
from moe_watch.signals.batching import BatchAnswer
from moe_watch.sizing.plan import PlanError, PlanFile, VllmSettings, load_plan
from moe_watch.sources.exposition import parse_engine_exposition
from tests.conftest import read_capture

VLLM_SERVE = [
    "/usr/bin/python3",
    "/usr/local/bin/vllm",
    "serve",
    "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "--host",
    "0.0.0.0",
    "--port",
    "8000",
    "--tensor-parallel-size",
    "8",
    "--gpu-memory-utilization",
    "0.92",
    "--max-num-seqs",
    "16",
    "--max-model-len",
    "65536",
    "--kv-cache-dtype",
    "fp8",
    "--dtype",
    "bfloat16",
]


def settings(drifts: list) -> set[str]:  # type: ignore[type-arg]
    return {d.setting for d in drifts}


def test_real_cache_config_info_and_a_real_looking_command_line() -> None:
    info = parse_engine_exposition(read_capture("after-load")).info
    running = running_from(info, VLLM_SERVE, max_model_len=65536, gpus=8)
    assert running.gpu_memory_utilization == 0.92  # cache_config_info says 0.92 on the capture
    assert running.max_num_seqs == 16
    assert running.kv_cache_dtype == "fp8"
    assert running.enable_prefix_caching is True  # the capture's enable_prefix_caching="True"
    assert running.expert_parallel is False
    assert running.model == "mistralai/Mixtral-8x22B-Instruct-v0.1"
    found = settings(find_drift(running))
    # a large MoE: gmu > 0.80, max_num_seqs > 8; prefix caching with FP8 KV; EP off on 8 GPUs
    assert found == {
        "gpu_memory_utilization",
        "max_num_seqs",
        "enable_prefix_caching",
        "enable_expert_parallel",
    }


def test_gpu_memory_utilization_rules() -> None:
    assert (
        settings(find_drift(Running(model="mixtral-8x7b", gpu_memory_utilization=0.92))) == set()
    )  # small MoE
    assert settings(find_drift(Running(model="mixtral-8x7b", gpu_memory_utilization=0.95))) == {
        "gpu_memory_utilization"
    }
    assert settings(find_drift(Running(model="deepseek-v3", gpu_memory_utilization=0.85))) == {
        "gpu_memory_utilization"
    }
    assert settings(find_drift(Running(model="deepseek-v3", gpu_memory_utilization=0.80))) == set()


def test_max_num_seqs_rule_only_for_large_moe() -> None:
    assert settings(find_drift(Running(model="kimi-k2", max_num_seqs=16))) == {"max_num_seqs"}
    assert settings(find_drift(Running(model="kimi-k2", max_num_seqs=8))) == set()
    assert settings(find_drift(Running(model="qwen1.5-moe-a2.7b", max_num_seqs=64))) == set()


def knee(batch: int | None, *, peak_reached: bool = True) -> BatchAnswer:
    return BatchAnswer((), batch, peak_reached, "", 8, 0.2, 300.0)


def test_a_measured_knee_decides_max_num_seqs_once_it_is_a_real_peak() -> None:
    # Throughput peaks at batch 8 (bin 6-11): 16 seqs drift on any MoE, and the rule says so.
    small = Running(model="qwen1.5-moe-a2.7b", max_num_seqs=16)
    [drift] = find_drift(small, knee=knee(8))
    assert (drift.setting, drift.running, drift.expected) == ("max_num_seqs", "16", "<= 11")
    assert drift.rule.startswith("measured knee: tokens/s per GPU peaks at batch 8")
    assert max_num_seqs_rule(knee(8)) == MEASURED_KNEE
    # The knee overrules the static rule both ways: a large MoE at 32 is fine where the
    # traffic measured its peak at 32.
    assert find_drift(Running(model="kimi-k2", max_num_seqs=32), knee=knee(32)) == []
    assert find_drift(Running(model="kimi-k2", max_num_seqs=11), knee=knee(8)) == []
    # Thin evidence, or a best batch that nothing larger has challenged: the static rule.
    for unsure in (knee(None), knee(8, peak_reached=False), None):
        assert max_num_seqs_rule(unsure) == STATIC_RULE
        [static] = find_drift(Running(model="kimi-k2", max_num_seqs=16), knee=unsure)
        assert static.rule == "large MoE: start at 4-8"
        assert find_drift(small, knee=unsure) == []


def test_prefix_caching_with_fp8_kv_and_expert_parallel_off() -> None:
    assert settings(find_drift(Running(enable_prefix_caching=True, kv_cache_dtype="fp8"))) == {
        "enable_prefix_caching"
    }
    assert settings(find_drift(Running(enable_prefix_caching=False, kv_cache_dtype="fp8"))) == set()
    assert settings(find_drift(Running(expert_parallel=False, gpus=4))) == {
        "enable_expert_parallel"
    }
    assert settings(find_drift(Running(expert_parallel=False, gpus=1))) == set()


def test_against_the_plan() -> None:
    plan = PlanFile(
        model="mixtral-8x7b",
        dtype="fp8",
        gpus=8,
        vllm=VllmSettings(max_model_len=8192, max_num_seqs=8, gpu_memory_utilization=0.9),
    )
    running = Running(
        model="mixtral-8x7b",
        dtype="bf16",
        gpus=4,
        max_model_len=32768,
        max_num_seqs=8,
        gpu_memory_utilization=0.9,
        expert_parallel=True,
    )
    drifts = {d.setting: d for d in find_drift(running, plan)}
    assert set(drifts) == {"max_model_len", "dtype", "gpus"}
    assert (drifts["dtype"].running, drifts["dtype"].expected) == ("bf16", "fp8")
    assert (drifts["max_model_len"].running, drifts["max_model_len"].expected) == ("32768", "8192")
    within = Running(
        model="mixtral-8x7b",
        dtype="fp8",
        gpus=8,
        max_model_len=12000,
        max_num_seqs=4,
        expert_parallel=True,
    )
    assert settings(find_drift(within, plan)) == {"max_num_seqs"}  # differs from the plan's 8


def test_plan_errors_name_the_file_and_the_line(tmp_path: Path) -> None:
    good = tmp_path / "mixtral.yaml"
    good.write_text(
        "model: mixtral-8x7b\ndtype: bf16\ngpu: h100-80\ngpus: 2\nvllm:\n  max_num_seqs: 8\n"
    )
    assert load_plan(good).gpus == 2
    unknown = tmp_path / "typo-model.yaml"
    unknown.write_text("dtype: bf16\nmodel: mixtrall-8x7b\n")
    with pytest.raises(
        PlanError, match=r"typo-model\.yaml:2: model: unknown model 'mixtrall-8x7b'"
    ):
        load_plan(unknown)
    typo = tmp_path / "typo-key.yaml"
    typo.write_text("model: mixtral-8x7b\nvllm:\n  max_num_seq: 8\n")
    with pytest.raises(
        PlanError, match=r"typo-key\.yaml:3: vllm\.max_num_seq: unknown plan setting"
    ):
        load_plan(typo)


async def test_the_agent_exports_budget_headroom_and_drift(tmp_path: Path) -> None:
    from moe_watch.agent import Agent
    from moe_watch.config import load_settings
    from moe_watch.demo.fake_nvml import GIB, FakeNvml
    from tests.conftest import EngineStub
    from tests.test_agent import exposition, value

    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "model: mixtral-8x7b\ndtype: bf16\ngpu: h100-80\ngpus: 2\nvllm:\n  gpu_memory_utilization: 0.9\n  max_model_len: 256\n"
    )
    stub = await EngineStub(read_capture("after-load")).start()  # gmu 0.92, max_model_len 1024
    fake = FakeNvml.with_gpus(2)
    for gpu in fake.gpus:
        gpu.memory_used_bytes = 60 * GIB
        gpu.pids = [os.getpid()]  # this test process: not a vLLM command line
    try:
        config = load_settings(
            None, targets=[{"name": "mixtral-0", "url": stub.url, "plan": str(plan)}]
        )
        async with Agent(config, nvml=fake) as agent:
            snap = await agent.run_cycle()
    finally:
        await stub.stop()
    m = exposition(snap)
    budget = value(m, "moe_watch_sized_budget_bytes", engine="mixtral-0")
    assert 40e9 < budget < 80e9
    assert value(m, "moe_watch_budget_used_ratio", engine="mixtral-0", gpu="0") == pytest.approx(
        60 * GIB / budget
    )
    assert value(m, "moe_watch_memory_headroom_ratio", gpu="1") == pytest.approx(
        1 - 60 / 80, abs=0.01
    )
    assert value(m, "moe_watch_config_drift", engine="mixtral-0", setting="max_model_len") == 1
    assert (
        value(m, "moe_watch_config_drift", engine="mixtral-0", setting="gpu_memory_utilization")
        == 1
    )
    assert value(m, "moe_watch_config_drift", engine="mixtral-0", setting="dtype") == 0
    assert status_document(snap)["drift"]["mixtral-0"][0]["running"]


def test_expert_parallelism_without_nvlink_drifts() -> None:
    pcie = Running(expert_parallel=True, gpus=4, interconnect="pcie")
    drifts = {d.setting: d for d in find_drift(pcie)}
    assert set(drifts) == {"interconnect"}
    assert (drifts["interconnect"].running, drifts["interconnect"].expected) == ("pcie", "nvlink")
    assert "NVLink" in drifts["interconnect"].rule
    assert (
        settings(find_drift(Running(expert_parallel=True, gpus=4, interconnect="nvlink"))) == set()
    )
    assert settings(find_drift(Running(expert_parallel=None, gpus=4, interconnect="pcie"))) == set()
    assert settings(find_drift(Running(expert_parallel=True, gpus=4))) == set()  # unknown link


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-num-seqs", "nan"),
        ("--max-num-seqs", "1e400"),
        ("--max-num-seqs", "inf"),
        ("--max-num-seqs", "0"),
        ("--max-num-seqs", "8.5"),
        ("--max-num-seqs", "99999999999999999999"),
        ("--max-model-len", "nan"),
        ("--max-model-len", "1" + "0" * 309),
        ("--gpu-memory-utilization", "nan"),
        ("--gpu-memory-utilization", "1.5"),
        ("--gpu-memory-utilization", "inf"),
    ],
)
def test_a_running_value_that_is_no_number_in_range_is_refused_and_named(
    flag: str, value: str
) -> None:
    # Before: int(float("nan")) raised ValueError and int(float("1e400")) OverflowError inside
    # the agent's cycle; "1.5" was believed.
    running = running_from({}, ["vllm", "serve", "m", flag, value], None, 1)
    setting = flag.removeprefix("--").replace("-", "_")
    assert getattr(running, setting) is None
    assert running.refused == (f"{setting}={value[:32]}",)
    find_drift(running)  # and the rules run on what is left


def test_values_in_range_are_read_and_forms_the_parser_does_not_know_are_unknown() -> None:
    running = running_from(
        {"gpu_memory_utilization": "0.9"},
        ["vllm", "serve", "m", "--max-num-seqs", "256", "--max-model-len", "32k"],
        None,
        2,
    )
    assert (running.max_num_seqs, running.gpu_memory_utilization) == (256, 0.9)
    assert running.max_model_len is None  # vLLM's "32k": not read, and not refused either
    assert running.refused == ()


def test_every_drift_names_one_of_the_settings_and_all_are_exported() -> None:
    with pytest.raises(ValueError, match=r"not in drift\.SETTINGS"):
        Drift("max_num_seq", "9", "8", "typo")
    assert list(SETTINGS) == sorted(SETTINGS)
    flags = setting_flags([Drift("dtype", "fp8", "bf16", "differs from the plan")])
    assert [name for name, _ in flags] == list(SETTINGS)
    assert dict(flags) == {name: name == "dtype" for name in SETTINGS}
