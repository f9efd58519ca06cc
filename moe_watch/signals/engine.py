"""Engine-level signals from a window of one model's samples on one engine."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.signals.counters import rate, ratio_of_increases
from moe_watch.signals.histograms import quantile, window_delta
from moe_watch.signals.republish import REPUBLISHED, republished

QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class EngineSignals:
    """What the exporter publishes for one (engine, model). None means "not known"."""

    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage_ratio: float | None = None
    kv_cache_hit_ratio: float | None = None
    kv_cache_free_tokens: float | None = None
    kv_cache_capacity_tokens: float | None = None
    preemptions_per_second: float | None = None
    generation_tokens_per_second: float | None = None
    prompt_tokens_per_second: float | None = None
    requests_per_second: float | None = None
    # (latency kind, quantile) -> seconds, only where the window saw observations.
    latency_seconds: Mapping[tuple[str, float], float] = field(default_factory=dict)
    # The engine's latest cumulative histograms, re-published for Prometheus (republish.py).
    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    # Finished requests since the engine started, by finish reason (vLLM's finished_reason).
    requests_finished: Mapping[str, float] = field(default_factory=dict)


def derive_engine_signals(window: Sequence[tuple[float, ModelSample]]) -> EngineSignals:
    """Signals over a window of ``(timestamp, sample)``, oldest first. Pure."""
    if not window:
        return EngineSignals()
    latest = window[-1][1]
    gauges = latest.gauges
    usage = _clamp_ratio(gauges.get(s.GAUGE_KV_CACHE_USAGE))
    capacity = gauges.get(s.GAUGE_KV_CACHE_CAPACITY_TOKENS)
    free = capacity * (1.0 - usage) if capacity is not None and usage is not None else None
    return EngineSignals(
        requests_running=gauges.get(s.GAUGE_REQUESTS_RUNNING),
        requests_waiting=gauges.get(s.GAUGE_REQUESTS_WAITING),
        kv_cache_usage_ratio=usage,
        kv_cache_hit_ratio=_hit_ratio(window),
        kv_cache_free_tokens=free,
        kv_cache_capacity_tokens=capacity,
        preemptions_per_second=_rate(window, s.COUNTER_PREEMPTIONS),
        generation_tokens_per_second=_rate(window, s.COUNTER_GENERATION_TOKENS),
        prompt_tokens_per_second=_rate(window, s.COUNTER_PROMPT_TOKENS),
        requests_per_second=_rate(window, s.COUNTER_REQUESTS_FINISHED),
        latency_seconds=_latency_quantiles(window),
        histograms={
            key: republished(key, latest.histograms[key])
            for key in REPUBLISHED
            if key in latest.histograms
        },
        requests_finished=latest.labelled_counters.get(s.COUNTER_REQUESTS_FINISHED, {}),
    )


def _rate(window: Sequence[tuple[float, ModelSample]], key: str) -> float | None:
    points = [(t, sample.counters[key]) for t, sample in window if key in sample.counters]
    return rate(points)


def _hit_ratio(window: Sequence[tuple[float, ModelSample]]) -> float | None:
    pairs = [
        (sample.counters[s.COUNTER_PREFIX_HITS], sample.counters[s.COUNTER_PREFIX_QUERIES])
        for _, sample in window
        if s.COUNTER_PREFIX_HITS in sample.counters and s.COUNTER_PREFIX_QUERIES in sample.counters
    ]
    if len(pairs) >= 2:
        return ratio_of_increases([h for h, _ in pairs], [q for _, q in pairs])
    # Engines that publish only a ratio (SGLang's cache_hit_rate): use the latest value.
    return _clamp_ratio(window[-1][1].gauges.get(s.GAUGE_KV_CACHE_HIT_RATE))


class WindowQuantiles(Mapping[tuple[str, float], float]):
    """(latency kind, quantile) -> seconds over the window, only where it saw observations.

    Computed on first read, not in the cycle: alerts and dashboards take percentiles from the
    re-published buckets in Prometheus, and only /status reads these (a few per hour, against
    ~3 ms per DeepSeek-V3-sized cycle for the bucket deltas)."""

    __slots__ = ("_series", "_values")

    def __init__(self, series: Mapping[str, Sequence[Histogram]]) -> None:
        self._series = series
        self._values: dict[tuple[str, float], float] | None = None

    def _computed(self) -> dict[tuple[str, float], float]:
        if self._values is None:
            values: dict[tuple[str, float], float] = {}
            for kind, histograms in self._series.items():
                delta = window_delta(histograms)
                if delta is None:
                    continue
                for q in QUANTILES:
                    value = quantile(q, delta)
                    if value is not None:
                        values[(kind, q)] = value
            self._values, self._series = values, {}
        return self._values

    def __getitem__(self, key: tuple[str, float]) -> float:
        return self._computed()[key]

    def __iter__(self) -> Iterator[tuple[str, float]]:
        return iter(self._computed())

    def __len__(self) -> int:
        return len(self._computed())

    def __repr__(self) -> str:
        return f"WindowQuantiles({self._computed()!r})"


def _latency_quantiles(window: Sequence[tuple[float, ModelSample]]) -> WindowQuantiles:
    return WindowQuantiles(
        {
            kind: [sample.histograms[kind] for _, sample in window if kind in sample.histograms]
            for kind in s.LATENCY_KINDS
        }
    )


def _clamp_ratio(value: float | None) -> float | None:
    return None if value is None else min(1.0, max(0.0, value))
