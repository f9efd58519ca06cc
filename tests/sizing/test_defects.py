"""The sizing defects users hit on DeepSeek, Qwen3 and Llama-4-scale MoE, each pinned by a test.

- MLA under TP 8: every TP rank holds the whole latent cache of its sequences;
- GQA with fewer KV heads than TP ranks: vLLM replicates KV heads, max(1, kv_heads // TP);
- only deployable layouts (whole nodes beyond one node; TP inside a node);
- the user's max_num_seqs stays the target; design-note rules are labelled as such.
"""

from __future__ import annotations

import json

import pytest

from moe_watch.cli import main
from moe_watch.sizing.budget import size
from moe_watch.sizing.catalog import find_model

GB = 1e9


def test_mla_under_tp8_holds_the_whole_latent_cache_on_every_gpu() -> None:
    spec = find_model("deepseek-v3")
    tp8 = size(spec, dtype="fp8", gpu="h200", gpus=8, tp=8, max_num_seqs=256)
    # 61 layers x (512 + 64) x 2 bytes = 70,272 B per token, all of it on each of the 8 ranks
    assert (tp8.tp, tp8.dp) == (8, 1)
    assert tp8.kv_per_gpu_gb == pytest.approx(70_272 * 8192 * 256 / GB)  # 147.4 GB
    assert tp8.kv_per_gpu_gb == pytest.approx(147.4, abs=0.05)
    assert not tp8.fits
    # data-parallel attention divides the sequences: 32 per rank, 18.4 GB each
    dp8 = size(spec, dtype="fp8", gpu="h200", gpus=8, dp=8, max_num_seqs=256)
    assert (dp8.tp, dp8.dp, dp8.ep) == (1, 8, 8)
    assert dp8.kv_per_gpu_gb == pytest.approx(70_272 * 8192 * 32 / GB)


def test_mla_tp8_verdict_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["size", "--model", "deepseek-v3", "--dtype", "fp8", "--gpu", "h200", "--gpus", "8",
            "--max-num-seqs", "256", "--tp", "8"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT on 8 x h200 under TP 8, EP 8" in out
    assert "147.4 GB" in out


def test_qwen3_gqa_with_4_kv_heads_under_tp8_replicates_them() -> None:
    spec = find_model("qwen3-235b-a22b")
    plan = size(spec, dtype="fp8", gpu="h200", gpus=8, tp=8, max_num_seqs=64)
    # max(1, 4 // 8) = 1 KV head per rank: 94 layers x K,V x 1 x 128 x 2 bytes, not a TP 8 share
    assert plan.chosen.kv.bytes_per_token == 94 * 2 * 1 * 128 * 2 == 48_128
    even_share = 94 * 2 * 4 * 128 * 2 / 8
    assert plan.chosen.kv.bytes_per_token == 2 * even_share
    assert plan.kv_per_gpu_gb == pytest.approx(48_128 * 8192 * 64 / GB)


def test_no_layout_of_11_gpus_is_proposed_or_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    plan = size(find_model("deepseek-v3"), dtype="fp8", gpu="h100", gpus=8)
    assert plan.smallest is not None
    assert plan.smallest.gpus == 16
    assert plan.smallest.nodes == "16 = 2 nodes x 8"
    labels = [option.label for option in plan.smallest.fitting]
    assert "TP 8 x PP 2, EP 8" in labels
    assert all(option.layout.gpus == 16 for option in plan.smallest.fitting)
    assert main(["size", "--model", "deepseek-v3", "--gpu", "h100", "--gpus", "11"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "11 GPUs is not a deployable layout" in err
    assert "(8 or 16" in err


def test_the_users_max_num_seqs_stays_the_target(capsys: pytest.CaptureFixture[str]) -> None:
    spec = find_model("deepseek-v3")
    plan = size(spec, dtype="fp8", gpu="h200", gpus=8, tp=8, max_num_seqs=256)
    seqs = next(s for s in plan.recommended if s.name == "max_num_seqs")
    assert seqs.value == 256
    assert "your target: 256" in seqs.source
    assert any("design notes" in note and "256 is kept" in note for note in plan.notes)
    gmu = next(s for s in plan.recommended if s.name == "gpu_memory_utilization")
    assert gmu.source.startswith("design notes")
    # under DP 8 vLLM's max_num_seqs is per rank: 256 / 8
    dp8 = size(spec, dtype="fp8", gpu="h200", gpus=8, dp=8, max_num_seqs=256)
    seqs = next(s for s in dp8.recommended if s.name == "max_num_seqs")
    assert seqs.value == 32
    assert "per DP rank" in seqs.source
    argv = ["size", "--model", "deepseek-v3", "--dtype", "fp8", "--gpu", "h200", "--gpus", "8",
            "--max-num-seqs", "256", "--tp", "8", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["target"]["max_num_seqs"] == 256
    recommended = {s["name"]: s for s in data["recommended"]}
    assert recommended["max_num_seqs"]["value"] == 256
