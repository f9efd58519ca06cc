"""Which experts each MoE layer reaches for each prompt, as transformers routes the same tokens.

Run with the vLLM venv's python (it has torch and transformers):

    python route_prompts.py MODEL_DIR PROMPTS_JSON OUT_JSON

OUT_JSON: one entry per prompt, ``{layer: sorted distinct experts of its top-k routing}``: what
a step that prefills exactly that prompt reaches in each layer. An independent record of the
routing the vLLM plugin's coverage sampler measures (it never looks at the plugin).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from craft_hot_expert import route


def main(argv: list[str]) -> int:
    import torch
    from transformers import MixtralForCausalLM

    model_dir, prompts_path, out = Path(argv[1]), Path(argv[2]), Path(argv[3])
    prompts: list[list[int]] = json.loads(prompts_path.read_text())
    model = MixtralForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    reached = []
    for ids in prompts:
        _, chosen = route(model, [ids])
        reached.append(
            {str(layer): sorted({int(e) for e in torch.cat(c).reshape(-1).tolist()})
             for layer, c in sorted(chosen.items())}
        )  # fmt: skip
    out.write_text(json.dumps(reached))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
