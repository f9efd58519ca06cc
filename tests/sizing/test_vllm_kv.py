"""Ground truth: vLLM 0.32's own KV arithmetic against ours, for every catalog model with a config.

vLLM's ``ModelConfig`` is built from each config.json in tests/sizing/configs (offline, no
weights) in the cached vLLM venv; ``vllm_kv_driver.py`` records, at TP 1, 2, 4 and 8, the KV
heads per rank, head size, MLA detection and the bytes per token of the KV cache specs vLLM's
attention layers return (BF16 and FP8 caches), its PP partition and its sliding / chunked window
bounds. Each must equal kv.py's figure for the catalog entry exactly. Grok-1 has no config
(configs/README.md).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bench.vllm_env import ensure_vllm_venv
from moe_watch.sizing.catalog import find_model
from moe_watch.sizing.kv import heads_per_rank, kv_shape, pp_stage_layers, window_tokens
from tests.sizing.test_catalog_configs import CONFIGS, config_names

pytestmark = pytest.mark.vllm

DRIVER = Path(__file__).parent / "vllm_kv_driver.py"
TPS = (1, 2, 4, 8)
# (in-flight tokens, max_model_len) the window bounds are compared at
WINDOW_CASES = [[16384, 131072], [16384, 8192], [4096, 131072], [4096, 2000], [4096, 2001]]
# The real config class of deepseek-moe-16b is remote code (configuration_deepseek.py), not here.
STAND_IN_CONFIG = """from transformers import PretrainedConfig


class DeepseekConfig(PretrainedConfig):
    model_type = "deepseek"
"""


def model_dir(root: Path, name: str) -> Path:
    """A directory vLLM loads offline: config.json only (plus a stand-in config class)."""
    config: dict[str, Any] = json.loads((CONFIGS / f"{name}.json").read_text())
    folder = root / name
    folder.mkdir()
    if "text_config" in config:  # Llama 4: its language model (no torchvision in the venv)
        config = {**config["text_config"], "architectures": ["Llama4ForCausalLM"]}
    if config.get("model_type") == "deepseek":
        config["auto_map"] = {"AutoConfig": "configuration_deepseek.DeepseekConfig"}
        (folder / "configuration_deepseek.py").write_text(STAND_IN_CONFIG)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def vllm_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    python = ensure_vllm_venv()
    root = tmp_path_factory.mktemp("vllm-kv")
    cases: dict[str, Any] = {"_windows": {"cases": WINDOW_CASES}}
    for name in config_names():
        cases[name] = {"dir": str(model_dir(root, name))}
    given, answer = root / "cases.json", root / "answer.json"
    given.write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run(
        [str(python), str(DRIVER), str(given), str(answer)],
        capture_output=True, text=True, timeout=600, env=env, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    answers: dict[str, Any] = json.loads(answer.read_text())
    return answers


@pytest.mark.parametrize("name", config_names())
def test_vllm_agrees_on_the_attention_shape(name: str, vllm_answers: dict[str, Any]) -> None:
    got, spec = vllm_answers[name], find_model(name)
    assert got["use_mla"] == spec.uses_mla
    assert got["layers"] == spec.layers
    assert got["attention_heads"] == spec.attention_heads
    if spec.uses_mla:
        assert got["head_size"] == spec.kv_lora_rank + spec.qk_rope_head_dim
    else:
        assert got["head_size"] == spec.head_dim
        assert got["total_kv_heads"] == spec.kv_heads
    assert got["window_kind"] == spec.window_kind
    assert got["window"] == spec.window
    assert tuple(got["window_layers"]) == spec.window_layers
    for pp, ranges in got["pp"].items():
        assert [end - start for start, end in ranges] == pp_stage_layers(spec.layers, int(pp))


@pytest.mark.parametrize("name", config_names())
@pytest.mark.parametrize("tp", TPS)
def test_vllm_agrees_on_kv_bytes_per_token_per_gpu(
    name: str, tp: int, vllm_answers: dict[str, Any]
) -> None:
    row, spec = vllm_answers[name]["tp"][str(tp)], find_model(name)
    assert row["kv_heads"] == heads_per_rank(spec, tp)
    assert row["layers"] == spec.layers
    # vLLM's "auto" KV dtype is the checkpoint's bfloat16; FP8 as served on Hopper
    assert row["bytes_per_token"]["auto"] == kv_shape(spec, tp=tp, kv_dtype="bf16").bytes_per_token
    assert (
        row["bytes_per_token"]["fp8"]
        == kv_shape(spec, tp=tp, kv_dtype="fp8", gpu="h100-80").bytes_per_token
    )


@pytest.mark.parametrize("name", [n for n in config_names() if find_model(n).window])
def test_vllm_agrees_on_window_bounds(name: str, vllm_answers: dict[str, Any]) -> None:
    spec = find_model(name)
    bounds = vllm_answers[name]["window_tokens"]
    assert len(bounds) == len(WINDOW_CASES)
    for in_flight, max_len, tokens in bounds:
        ours = window_tokens(spec.window_kind, spec.window, max_len, in_flight, chunked_hybrid=True)
        assert ours == tokens, (in_flight, max_len)
