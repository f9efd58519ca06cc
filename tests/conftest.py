"""Shared test fixtures: the real engine captures."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def read_capture(state: str) -> str:
    """A real vLLM 0.32 exposition (see tests/fixtures/vllm/README.md)."""
    return (FIXTURES / "vllm" / f"vllm-0.32-cpu-tiny-mixtral.{state}.prom").read_text()


@pytest.fixture
def vllm_capture() -> str:
    return read_capture("after-load")
