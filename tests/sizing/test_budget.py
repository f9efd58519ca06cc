"""Sizing reproduces the operator documents' figures and verdicts; KV maths by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_watch.cli import main
from moe_watch.sizing.budget import kv_bytes_per_token, size, weights_bytes
from moe_watch.sizing.catalog import CATALOG, find_model, from_hf_config

GB = 1e9


@pytest.mark.parametrize(
    ("model", "bf16", "fp8", "int4"),
    [
        ("deepseek-v3.2", 1370, 685, 343),
        ("kimi-k2", 2000, 1000, 500),
        ("llama-4-maverick", 800, 400, 200),
        ("mixtral-8x22b", 282, 141, 70),
        ("qwen2-57b-a14b", 114, 57, 28),
    ],
)
def test_weights_by_dtype_match_the_documents(
    model: str, bf16: float, fp8: float, int4: float
) -> None:
    spec = find_model(model)
    assert weights_bytes(spec, "bf16") / GB == pytest.approx(bf16, rel=0.01)
    assert weights_bytes(spec, "fp8") / GB == pytest.approx(fp8, rel=0.01)
    assert weights_bytes(spec, "int4") / GB == pytest.approx(int4, rel=0.02)


def test_mixtral_8x7b_is_about_94_gb_in_bf16() -> None:
    assert weights_bytes(find_model("mixtral-8x7b"), "bf16") / GB == pytest.approx(94, rel=0.01)


def test_documented_verdicts() -> None:
    deepseek = find_model("deepseek-v3.2")
    assert size(deepseek, dtype="fp8", gpu="h200-141", gpus=8).fits
    assert not size(deepseek, dtype="fp8", gpu="h100-80", gpus=8).fits
    kimi = size(find_model("kimi-k2"), dtype="fp8", gpu="h200-141", gpus=8)
    assert kimi.weights_gb * 1.15 == pytest.approx(1150)
    assert not kimi.fits  # 1,150 GB > 8 x 141 = 1,128 GB
    assert size(find_model("qwen2-57b-a14b"), dtype="fp8", gpu="h100-80", gpus=1).fits


def test_kv_bytes_per_token_by_hand() -> None:
    # Mixtral 8x7B, GQA: K and V x 32 layers x 8 KV heads x 128 dims x 2 bytes
    assert kv_bytes_per_token(find_model("mixtral-8x7b"), "bf16") == 2 * 32 * 8 * 128 * 2 == 131_072
    # DeepSeek-V3, MLA: 61 layers x (kv_lora_rank 512 + rope 64) x 2 bytes
    assert kv_bytes_per_token(find_model("deepseek-v3"), "bf16") == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(find_model("deepseek-v3"), "fp8") == 35_136  # FP8 KV halves it


def test_per_gpu_split_and_the_smallest_fitting_count() -> None:
    plan = size(
        find_model("mixtral-8x7b"),
        dtype="bf16",
        gpu="h100-80",
        gpus=2,
        max_model_len=8192,
        max_num_seqs=8,
    )
    kv = 131_072 * 8192 * 8 / GB
    assert plan.kv_total_gb == pytest.approx(kv)
    assert plan.rule_115_total_gb == pytest.approx(93.4 * 1.15 + kv)
    # picked: TP 2 (the dense part halves too); 8 KV heads split 4 + 4, so the KV halves
    assert (plan.tp, plan.dp, plan.ep) == (2, 1, 2)
    assert plan.itemised.weights_gb == pytest.approx(93.4 / 2, rel=0.01)
    assert plan.kv_per_gpu_gb == pytest.approx(kv / 2)
    assert plan.rule_115_per_gpu_gb == pytest.approx(plan.itemised.weights_gb * 1.15 + kv / 2)
    assert plan.fits
    assert {option.label for option in plan.options} == {"TP 2, EP 2", "DP 2 + EP 2"}
    one = size(find_model("mixtral-8x7b"), dtype="bf16", gpu="h100-80", gpus=1)
    assert one.smallest_fitting_gpus == 2
    assert {s.name: s.value for s in plan.recommended}["enable_expert_parallel"] is True


def test_every_model_design_md_names_is_in_the_catalog() -> None:
    names = {spec.name for spec in CATALOG}
    for wanted in ("mixtral-8x7b", "mixtral-8x22b", "deepseek-v3", "deepseek-v3.2", "kimi-k2", "qwen3-235b-a22b",
                   "qwen2-57b-a14b", "qwen1.5-moe-a2.7b", "deepseek-moe-16b", "dbrx", "llama-4-maverick", "grok-1", "glm-5"):  # fmt: skip
        assert wanted in names


def test_a_hugging_face_config_json_gives_the_same_shape(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    }))  # fmt: skip
    spec = from_hf_config(config)
    catalog = find_model("mixtral-8x7b")
    assert (spec.layers, spec.moe_layers, spec.routed_experts, spec.top_k) == (32, 32, 8, 2)
    assert kv_bytes_per_token(spec) == kv_bytes_per_token(catalog)
    assert spec.total_params_b == pytest.approx(46.7, rel=0.02)  # estimated from the shape


def test_size_cli_prints_a_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["size", "--model", "deepseek-v3.2", "--dtype", "fp8", "--gpu", "h100", "--gpus", "8"])
        == 0
    )
    table = capsys.readouterr().out
    assert "DOES NOT FIT on 8 x h100 under " in table
    assert "smallest h100 count that fits: 16 = 2 nodes x 8: " in table
    assert main(["size", "--model", "qwen2-57b-a14b", "--dtype", "fp8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True
    assert data["layout"]["label"] == "TP 1"
    assert data["layout"]["itemised"]["free_gb"] > 0
    assert main(["size", "--model", "mixtral-8x7"]) == 2
    assert "unknown model 'mixtral-8x7'" in capsys.readouterr().err


def test_the_plan_names_the_interconnect_expert_parallelism_needs() -> None:
    from moe_watch.sizing.budget import interconnect_requirement
    from moe_watch.sizing.report import render_plan

    spec = find_model("mixtral-8x7b")
    nvlink = size(spec, gpu="h100", gpus=4)
    assert "over NVLink" in nvlink.interconnect
    assert "nvidia-smi topo -m" in nvlink.interconnect
    assert "no NVLink" not in nvlink.interconnect
    assert f"interconnect: {nvlink.interconnect}" in render_plan(nvlink)
    assert nvlink.to_dict()["interconnect"] == nvlink.interconnect
    pcie = size(spec, gpu="l40s", gpus=4)
    assert pcie.interconnect.startswith("l40s has no NVLink")
    assert "PCIe" in pcie.interconnect
    assert "network" in interconnect_requirement("h100", 16)
    assert "no expert-parallel" in interconnect_requirement("h100", 1)
