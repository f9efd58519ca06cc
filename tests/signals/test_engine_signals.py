import math
from typing import Any

import pytest

from moe_watch import samples as s
from moe_watch.samples import Histogram, ModelSample
from moe_watch.signals.engine import derive_engine_signals

INF = math.inf


def sample(
    t: float,
    *,
    gen: float,
    hits: float,
    queries: float,
    preempt: float,
    e2e: tuple[float, ...],
    usage: float = 0.5,
) -> tuple[float, ModelSample]:
    return (
        t,
        ModelSample(
            model="m",
            gauges={
                s.GAUGE_REQUESTS_RUNNING: 4,
                s.GAUGE_REQUESTS_WAITING: 2,
                s.GAUGE_KV_CACHE_USAGE: usage,
                s.GAUGE_KV_CACHE_CAPACITY_TOKENS: 1000,
            },
            counters={
                s.COUNTER_GENERATION_TOKENS: gen,
                s.COUNTER_PREFIX_HITS: hits,
                s.COUNTER_PREFIX_QUERIES: queries,
                s.COUNTER_PREEMPTIONS: preempt,
            },
            histograms={
                s.LATENCY_E2E: Histogram(
                    tuple(zip((1.0, 10.0, 30.0, INF), e2e, strict=True)), e2e[-1], 0.0
                )
            },
        ),
    )


def test_engine_signals_over_a_window_hand_computed() -> None:
    window = [
        sample(0.0, gen=1000, hits=10, queries=100, preempt=0, e2e=(0, 0, 0, 0)),
        sample(10.0, gen=1600, hits=40, queries=200, preempt=1, e2e=(50, 90, 100, 100)),
        sample(
            20.0, gen=2000, hits=70, queries=300, preempt=3, e2e=(90, 180, 199, 200), usage=0.75
        ),
    ]
    sig = derive_engine_signals(window)
    assert sig.generation_tokens_per_second == pytest.approx(1000 / 20)
    assert sig.preemptions_per_second == pytest.approx(3 / 20)
    assert sig.kv_cache_hit_ratio == pytest.approx(60 / 200)
    assert sig.kv_cache_usage_ratio == pytest.approx(0.75)
    assert sig.kv_cache_free_tokens == pytest.approx(250)
    assert sig.requests_running == 4
    assert sig.requests_waiting == 2
    # e2e delta buckets over the window: (0,1]=90, (1,10]=90, (10,30]=19, +Inf=1; 200 total.
    # P50 rank 100 -> (1,10]: 1 + 9 * (100-90)/90 = 2.0
    assert sig.latency_seconds[(s.LATENCY_E2E, 0.5)] == pytest.approx(2.0)
    # P95 rank 190 -> (10,30]: 10 + 20 * (190-180)/19
    assert sig.latency_seconds[(s.LATENCY_E2E, 0.95)] == pytest.approx(10 + 20 * 10 / 19)
    # P99 rank 198 -> (10,30]: 10 + 20 * (198-180)/19
    assert sig.latency_seconds[(s.LATENCY_E2E, 0.99)] == pytest.approx(10 + 20 * 18 / 19)


def test_window_quantiles_are_computed_on_first_read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only /status reads them: the cycle must not pay for the bucket deltas.
    import moe_watch.signals.engine as engine

    calls: list[int] = []
    real = engine.window_delta

    def counted(histograms: Any) -> Any:
        calls.append(len(histograms))
        return real(histograms)

    monkeypatch.setattr(engine, "window_delta", counted)
    window = [
        sample(0.0, gen=1000, hits=10, queries=100, preempt=0, e2e=(0, 0, 0, 0)),
        sample(10.0, gen=1600, hits=40, queries=200, preempt=1, e2e=(50, 90, 100, 100)),
    ]
    sig = derive_engine_signals(window)
    assert calls == []
    assert sig.latency_seconds[(s.LATENCY_E2E, 0.5)] == pytest.approx(1.0)
    assert dict(sig.latency_seconds) == {
        (s.LATENCY_E2E, 0.5): pytest.approx(1.0),
        (s.LATENCY_E2E, 0.95): pytest.approx(10 + 20 * 5 / 10),  # rank 95 in (10, 30]
        (s.LATENCY_E2E, 0.99): pytest.approx(10 + 20 * 9 / 10),
    }
    assert len(calls) == len(s.LATENCY_KINDS)  # once per kind, then remembered


def test_engine_signals_survive_a_restart_inside_the_window() -> None:
    window = [
        sample(0.0, gen=5000, hits=50, queries=100, preempt=7, e2e=(10, 10, 10, 10)),
        sample(10.0, gen=100, hits=5, queries=10, preempt=0, e2e=(2, 2, 2, 2)),
    ]
    sig = derive_engine_signals(window)
    assert sig.generation_tokens_per_second == pytest.approx(10.0)  # 100 tokens since restart
    assert sig.preemptions_per_second == 0
    assert sig.kv_cache_hit_ratio == pytest.approx(0.5)
    assert sig.latency_seconds[(s.LATENCY_E2E, 0.5)] == pytest.approx(0.5)


def test_empty_window_knows_nothing() -> None:
    sig = derive_engine_signals([])
    assert sig.requests_running is None
    assert sig.latency_seconds == {}


def test_single_sample_has_gauges_but_no_rates_or_quantiles() -> None:
    sig = derive_engine_signals(
        [sample(0.0, gen=1, hits=1, queries=1, preempt=0, e2e=(1, 1, 1, 1))]
    )
    assert sig.kv_cache_usage_ratio == 0.5
    assert sig.generation_tokens_per_second is None
    assert sig.kv_cache_hit_ratio is None
    assert sig.latency_seconds == {}


def test_ratio_only_engines_use_the_published_hit_rate() -> None:
    sg = ModelSample(model="m", gauges={s.GAUGE_KV_CACHE_HIT_RATE: 0.42})
    assert derive_engine_signals([(0.0, sg)]).kv_cache_hit_ratio == pytest.approx(0.42)
