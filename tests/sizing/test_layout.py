"""Deployable vLLM layouts: what is accepted, what is refused (one line, exit 2), what is picked."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_watch.cli import main
from moe_watch.sizing.budget import size
from moe_watch.sizing.catalog import find_model
from moe_watch.sizing.layout import (
    Layout,
    candidate_gpu_counts,
    deployable_layouts,
    layout_problem,
    resolve_layout,
)
from moe_watch.sizing.plan import PlanError, load_plan


def test_labels_name_every_parallel_dimension() -> None:
    assert Layout(tp=8).label == "TP 8, EP 8"
    assert Layout(tp=1, dp=8).label == "DP 8 + EP 8"
    assert Layout(tp=8, pp=2).label == "TP 8 x PP 2, EP 8"
    assert Layout(tp=2, dp=4).label == "TP 2 x DP 4 + EP 8"
    assert Layout(tp=1).label == "TP 1"
    assert Layout(tp=8, expert_parallel=False).label == "TP 8"
    assert Layout(tp=4, dp=2).ep == 8  # vLLM's expert group is TP x DP


def test_tp_must_divide_attention_heads_and_respect_kv_heads() -> None:
    llama4 = find_model("llama-4-maverick")  # 40 heads, 8 KV heads
    assert layout_problem(llama4, Layout(tp=8), 8) is None
    assert "does not divide" in str(layout_problem(llama4, Layout(tp=3), 8))
    assert "KV heads" in str(layout_problem(llama4, Layout(tp=5), 8))  # 40 % 5 == 0, 8 % 5 != 0
    qwen2 = find_model("qwen2-57b-a14b")  # 28 heads, 4 KV heads
    assert "KV heads" in str(layout_problem(qwen2, Layout(tp=7, dp=1), 8))


def test_beyond_one_node_only_whole_nodes_with_pp_stages_of_whole_nodes() -> None:
    spec = find_model("deepseek-v3")
    assert "spans nodes" in str(layout_problem(spec, Layout(tp=16), 8))
    assert "(8 or 16" in str(layout_problem(spec, Layout(tp=1, dp=11), 8))
    assert layout_problem(spec, Layout(tp=8, pp=3), 8) is None  # 24 GPUs: a stage per node
    # 16 GPUs in 4 stages: a stage would be half a node
    assert "stages must be whole nodes" in str(layout_problem(spec, Layout(tp=4, pp=4), 8))
    labels = {layout.label for layout in deployable_layouts(spec, 16, 8)}
    assert {"TP 8 x PP 2, EP 8", "DP 16 + EP 16", "TP 8 x DP 2 + EP 16"} <= labels
    assert all(layout.gpus == 16 and layout.tp <= 8 for layout in deployable_layouts(spec, 16, 8))
    assert candidate_gpu_counts(8, 3) == [1, 2, 4, 8, 16, 24]
    assert candidate_gpu_counts(4, 2) == [1, 2, 4, 8]


def test_given_layouts_resolve_or_fail_with_one_reason() -> None:
    spec = find_model("deepseek-v3")
    assert resolve_layout(spec, 16, tp=8) == (16, Layout(tp=8, dp=2))
    assert resolve_layout(spec, None, tp=8, pp=2) == (16, Layout(tp=8, pp=2))
    assert resolve_layout(spec, 8, ep=1) == (8, None)  # EP off, layout still picked
    with pytest.raises(ValueError, match="not a multiple of TP 3"):
        resolve_layout(spec, 8, tp=3)
    with pytest.raises(ValueError, match=r"--ep 4 is not a vLLM layout: .* TP x DP = 8"):
        resolve_layout(spec, 8, tp=8, ep=4)
    with pytest.raises(ValueError, match="= 8 GPUs, not --gpus 16"):
        resolve_layout(spec, 16, tp=8, dp=1)
    with pytest.raises(ValueError, match="TP 16 spans nodes"):
        resolve_layout(spec, None, tp=16, gpus_per_node=8)
    assert resolve_layout(spec, None, tp=16, gpus_per_node=16) == (16, Layout(tp=16))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpus", "11"], "11 GPUs is not a deployable layout"),
        (["--gpus", "8", "--tp", "3"], "--gpus 8 is not a multiple of TP 3"),
        (["--tp", "16"], "TP 16 spans nodes"),
        (["--tp", "8", "--ep", "4"], "--ep 4 is not a vLLM layout"),
        (["--kv-dtype", "int4"], "unknown KV cache dtype 'int4'"),
        (["--gpu", "h300"], "unknown GPU 'h300'"),
    ],
)
def test_bad_layouts_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["size", "--model", "deepseek-v3", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]


def test_the_picked_layout_is_the_one_with_most_free_memory() -> None:
    plan = size(find_model("deepseek-v3"), dtype="fp8", gpu="h200", gpus=8, max_num_seqs=256)
    assert plan.layout_source.startswith("picked")
    assert plan.layout == Layout(tp=1, dp=8)  # DP attention: 18.4 GB of KV, not 147.4
    assert plan.fits
    frees = [option.itemised.free_gb for option in plan.options]
    assert frees == sorted(frees, reverse=True)
    assert [o.label for o in plan.options][-1] == "TP 8, EP 8"
    # the dense part is replicated by DP, split by TP: weights per GPU go the other way
    by_label = {o.label: o for o in plan.options}
    assert by_label["DP 8 + EP 8"].weights_gb > by_label["TP 8, EP 8"].weights_gb


def test_gpus_per_node_changes_what_is_deployable(capsys: pytest.CaptureFixture[str]) -> None:
    spec = find_model("mixtral-8x7b")
    plan = size(spec, gpu="l40s", gpus=1, gpus_per_node=4)
    assert plan.smallest is not None
    assert plan.smallest.gpus == 4  # 94 GB of BF16 weights on 48 GB cards: 3 would do, 4 tiles
    assert (
        main(
            [
                "size",
                "--model",
                "mixtral-8x7b",
                "--gpu",
                "l40s",
                "--gpus",
                "6",
                "--gpus-per-node",
                "4",
            ]
        )
        == 2
    )
    assert "(4 or 8" in capsys.readouterr().err


def test_plan_files_carry_the_layout_and_refuse_undeployable_ones(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "model: deepseek-v3\ndtype: fp8\ngpu: h200\ngpus: 8\ndata_parallel_size: 8\n"
        "vllm:\n  max_num_seqs: 256\n"
    )
    plan = load_plan(good)
    sized = plan.sized(tmp_path)
    assert sized.layout == Layout(tp=1, dp=8)
    assert sized.kv_per_gpu_gb == pytest.approx(70_272 * 8192 * 32 / 1e9)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: mixtral-8x7b\ngpus: 3\ntensor_parallel_size: 3\n")
    with pytest.raises(PlanError, match="TP 3 does not divide mixtral-8x7b's 32 attention heads"):
        load_plan(bad)
    no_ep = tmp_path / "no-ep.yaml"
    no_ep.write_text("model: mixtral-8x7b\ngpus: 2\nexpert_parallel: false\n")
    assert load_plan(no_ep).sized(tmp_path).ep == 1
