"""Expert coverage per step: how many experts of each MoE layer a step's tokens reach.

As the batch grows, its tokens spread over more of each layer's experts until a step reads
(nearly) every expert's weights, like a dense model. On a sample of real steps (one in
``MOE_WATCH_COVERAGE_SAMPLE_EVERY``, default 4) this counts, per layer, the experts that received
at least one of the step's tokens, and adds it to the bin of the step's token count (the fixed
power-of-two bins of ``moe_watch/signals/power_bins.py``).

How, without a host sync and without touching the routing callback: the counter's accumulator
only grows, so what one step routed is ``accumulator - accumulator before the step``. A sampled
step copies the accumulator before it runs (one device copy) and, after it, adds
``(after > before).sum(layer)`` to ``distinct[bin]`` (three small device ops). The step's token
count and its bin are host values the worker already has, so the sampled steps and their tokens
per bin are kept on the host. On a CUDA device an event recorded after the last sampled step's
ops lets the publisher's copy wait for them on its side stream (``wait_event``: the GPU waits,
no thread does), so the device sums it reads always belong to the host tallies it reads with
them. Because only the worker's step boundaries are involved, this works the same where vLLM
traces the routing callback into a compiled graph (CPU) or replays it from a CUDA graph.

Not measured under sequence-parallel MoE (each TP rank routes a shard of the step, not the step).
"""

from __future__ import annotations

import os
from typing import Any

from moe_watch.expert_file import StepCoverage
from moe_watch.signals.power_bins import BIN_COUNT, BINS, int_bin_index

DEFAULT_SAMPLE_EVERY = 4


def sample_every() -> int:
    """Measure one step in N (``MOE_WATCH_COVERAGE_SAMPLE_EVERY``, default 4; at least 1)."""
    raw = os.environ.get("MOE_WATCH_COVERAGE_SAMPLE_EVERY", "")
    try:
        value = int(raw) if raw else DEFAULT_SAMPLE_EVERY
    except ValueError:
        value = DEFAULT_SAMPLE_EVERY
    return max(1, value)


class CoverageSampler:
    """Distinct experts per layer on sampled steps, binned by the step's tokens (one worker)."""

    def __init__(
        self, accumulator: Any, num_experts: int, *, every: int | None = None, cuda: bool = False
    ) -> None:
        import torch

        self._torch = torch
        self.every = every if every is not None else sample_every()
        self._routed = accumulator[:, :num_experts]  # a view: the overflow column is not an expert
        layers = accumulator.shape[0]
        device = accumulator.device
        self._before = torch.zeros_like(self._routed)
        self.distinct = torch.zeros((BIN_COUNT, layers), dtype=torch.int64, device=device)
        self.steps = [0] * BIN_COUNT  # host tallies, under the counter's lock
        self.tokens = [0] * BIN_COUNT
        self._cuda = cuda
        self.done: Any = torch.cuda.Event() if cuda else None  # after the last sampled step
        self.any_sampled = False
        self._seen = 0
        self._bin: int | None = None  # the running step's bin, when it is sampled
        self._step_tokens = 0

    def step_begins(self, tokens: int) -> None:
        """Before a real step of ``tokens`` counted tokens: snapshot the accumulator if sampled."""
        self._bin = None
        if tokens <= 0:
            return
        self._seen += 1
        if (self._seen - 1) % self.every:
            return
        with self._torch.inference_mode():  # buffers are touched inside and outside it
            self._before.copy_(self._routed)
        self._bin = int_bin_index(tokens)
        self._step_tokens = tokens

    def step_ends(self, completed: bool) -> None:
        """After the step: add its distinct experts per layer to its bin (a failed step: not)."""
        index, self._bin = self._bin, None
        if index is None or not completed:
            return
        torch = self._torch
        with torch.inference_mode():
            hit = torch.gt(self._routed, self._before).sum(dim=1)
            self.distinct[index].add_(hit)
            if self.done is not None:
                self.done.record()
        self.steps[index] += 1
        self.tokens[index] += self._step_tokens
        self.any_sampled = True

    def file_field(self, distinct: list[list[int]]) -> StepCoverage:
        """The ``coverage`` object of the counts file, from a host copy of ``distinct``."""
        return StepCoverage(
            bins=list(BINS),
            steps=list(self.steps),
            tokens=list(self.tokens),
            distinct=distinct,
            sample_every=self.every,
        )
