"""Build a tiny random Mixtral (MoE) checkpoint plus a word-level tokenizer, offline.

Run with the vLLM venv's interpreter (it has torch, transformers and tokenizers)::

    python make_tiny_mixtral.py OUT_DIR

The result loads in vLLM with ``HF_HUB_OFFLINE=1``: config.json, model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json. Weights are random (fixed
seed), so the text it generates is nonsense; what matters is that every request routes tokens
through 8 experts (top-2) in each of 4 MoE layers, exactly like a real Mixtral.

Importing this module is cheap (no torch): the tests read ``WORDS`` to build prompts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 1234
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
# 14 * 5 = 70 syllables -> 4,900 two-syllable words; the first 400 (a stable, sorted order).
WORDS: tuple[str, ...] = tuple(
    a + b
    for a in (c + v for c in _CONSONANTS for v in _VOWELS)
    for b in (c + v for c in _CONSONANTS for v in _VOWELS)
)[:400]

VOCAB_SIZE = len(SPECIAL_TOKENS) + len(WORDS)

# The model: 4 MoE layers x 8 experts, top-2. vLLM's CPU attention needs head_size >= 32.
MODEL_CONFIG: dict[str, object] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
    "tie_word_embeddings": False,
}


def build_tokenizer(out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        model_max_length=2048,
    )
    fast.save_pretrained(str(out_dir))


def build_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(SEED)
    config = MixtralConfig(**MODEL_CONFIG)
    config.architectures = ["MixtralForCausalLM"]
    model = MixtralForCausalLM(config).to(torch.bfloat16).eval()
    # transformers >= 5 calls it ``dtype``; older releases and some readers use ``torch_dtype``.
    model.config.dtype = torch.bfloat16
    model.save_pretrained(str(out_dir), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        str(out_dir)
    )
    # Make sure the dtype is on disk under both spellings.
    config_path = out_dir / "config.json"
    data = json.loads(config_path.read_text())
    data.setdefault("torch_dtype", "bfloat16")
    data.setdefault("dtype", "bfloat16")
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} OUT_DIR", file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir)
    build_model(out_dir)
    print(f"tiny Mixtral written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
