"""Make one expert of one layer of the tiny Mixtral deliberately hot, and compute the ground truth.

Run with the vLLM venv's python (it has torch and transformers):

    python craft_hot_expert.py BASE_MODEL_DIR OUT_DIR LAYER EXPERT PROMPTS_JSON

A randomly initialised router is already skewed (the hidden states of a random model share one
dominant direction), so "which expert is hot" must be built, not hoped for: the mean direction
of the hidden states entering LAYER's router is added to EXPERT's gate row, scaled so that
EXPERT is in the top-2 of almost every token. OUT_DIR gets the crafted model (same format as the
base) and ``expected.json``: per layer, per expert, the top-2 routing that transformers computes
for the same prompt token ids (prefill only), i.e. what the vLLM plugin must count.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any


def routers(model: Any) -> list[tuple[int, Any]]:
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    found = []
    for name, module in model.named_modules():
        if isinstance(module, MixtralTopKRouter):
            found.append((int(re.search(r"layers\.(\d+)\.", name).group(1)), module))  # type: ignore[union-attr]
    return sorted(found, key=lambda item: item[0])


def route(
    model: Any, prompts: list[list[int]]
) -> tuple[dict[int, list[Any]], dict[int, list[Any]]]:
    """Per layer: the router inputs and the chosen top-k indices, over all prompt tokens."""
    import torch

    inputs: dict[int, list[Any]] = {}
    chosen: dict[int, list[Any]] = {}
    hooks = []
    for layer, router in routers(model):

        def hook(module: Any, args: Any, output: Any, layer: int = layer) -> None:
            inputs.setdefault(layer, []).append(args[0].reshape(-1, args[0].shape[-1]).float())
            chosen.setdefault(layer, []).append(output[2].reshape(-1, output[2].shape[-1]))

        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        for ids in prompts:
            model(input_ids=torch.tensor([ids]))
    for handle in hooks:
        handle.remove()
    return inputs, chosen


def main(argv: list[str]) -> int:
    import torch
    from transformers import MixtralForCausalLM

    base, out, layer, expert, prompts_path = (
        Path(argv[1]),
        Path(argv[2]),
        int(argv[3]),
        int(argv[4]),
        Path(argv[5]),
    )
    prompts: list[list[int]] = json.loads(prompts_path.read_text())
    model = MixtralForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16).eval()
    inputs, _ = route(model, prompts)
    hidden = torch.cat(inputs[layer])
    direction = hidden.mean(0)
    direction = direction / direction.norm()
    router = dict(routers(model))[layer]
    with torch.no_grad():
        logits = hidden @ router.weight.float().T
        others = logits.clone()
        others[:, expert] = float("-inf")
        second = others.topk(2, dim=-1).values[:, 1]  # beat the runner-up for a top-2 place
        along = hidden @ direction
        ahead = along > 0  # tokens on the dominant direction's side (most of them)
        need = ((second - logits[:, expert] + 1.0) / along.clamp(min=1e-3))[ahead]
        # Enough for a clear margin on typical tokens, but not a huge row: with bf16 logits a
        # giant one swamps the others' precision and scrambles the runner-up choice.
        scale = min(10.0, max(2.0, float(need.quantile(0.9))))
        router.weight[expert] += (scale * direction).to(router.weight.dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
    ):
        if (base / name).exists():
            shutil.copy(base / name, out / name)
    crafted = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()  # as served
    _, chosen = route(crafted, prompts)
    experts = crafted.config.num_local_experts
    expected = {
        str(index): torch.bincount(torch.cat(ids).reshape(-1), minlength=experts).tolist()
        for index, ids in sorted(chosen.items())
    }
    (out / "expected.json").write_text(
        json.dumps({"layer": layer, "expert": expert, "counts": expected})
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
