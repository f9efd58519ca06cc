"""Every catalog model with a config.json representation reads back as its catalog entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_watch.sizing.catalog import CATALOG, find_model, from_hf_config

CONFIGS = Path(__file__).parent / "configs"
# Catalog models without a config.json representation, and why (configs/README.md).
NO_CONFIG = {
    "grok-1": "xai-org/grok-1 ships a JAX checkpoint, no HF config.json; vLLM 0.32 dropped Grok-1",
}
KV_FIELDS = ("layers", "attention_heads", "kv_heads", "head_dim", "kv_lora_rank",
             "qk_rope_head_dim", "index_head_dim", "window", "window_kind", "window_layers")  # fmt: skip


def config_names() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*.json"))


def test_every_catalog_model_has_a_config_or_a_reason() -> None:
    assert set(config_names()) | set(NO_CONFIG) == {spec.name for spec in CATALOG}
    assert not set(config_names()) & set(NO_CONFIG)


@pytest.mark.parametrize("name", config_names())
def test_the_config_reads_as_the_catalog_entry(name: str) -> None:
    spec = from_hf_config(CONFIGS / f"{name}.json")
    catalog = find_model(name)
    for field in (*KV_FIELDS, "moe_layers", "routed_experts", "top_k", "hidden_size"):
        assert getattr(spec, field) == getattr(catalog, field), field
    assert spec.attention_kind == catalog.attention_kind
