"""The simulated engine: real-looking expositions, scenarios that show what they promise."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch import samples as s
from moe_watch.demo.engine_sim import SCENARIOS, EngineSim
from moe_watch.signals.experts import skew, token_shares
from moe_watch.sources.exposition import parse_engine_exposition


def run(name: str, seconds: int, seed: int = 0) -> EngineSim:
    sim = EngineSim(SCENARIOS[name], seed=seed, start_time=0.0)
    for t in range(1, seconds + 1):
        sim.advance(float(t))
    return sim


def test_same_seed_and_times_render_the_same_text() -> None:
    assert run("normal", 30).render() == run("normal", 30).render()
    assert run("normal", 30, seed=1).render() != run("normal", 30).render()


@pytest.mark.parametrize(
    ("flavor", "kind"), [("vllm", "vllm"), ("vllm_legacy", "vllm"), ("sglang", "sglang")]
)
def test_every_flavor_parses_with_prometheus_and_maps_to_every_canonical_key(
    flavor: str, kind: str
) -> None:
    text = run("normal", 60).render(flavor)  # type: ignore[arg-type]
    families = list(text_string_to_metric_families(text))
    assert families
    (model,) = parse_engine_exposition(text, "auto").models
    assert parse_engine_exposition(text, "auto").kind == kind
    assert set(s.LATENCY_KINDS) <= set(model.histograms)
    assert {
        s.COUNTER_GENERATION_TOKENS,
        s.COUNTER_PROMPT_TOKENS,
        s.COUNTER_REQUESTS_FINISHED,
    } <= set(model.counters)
    assert {
        s.GAUGE_REQUESTS_RUNNING,
        s.GAUGE_KV_CACHE_USAGE,
        s.GAUGE_KV_CACHE_CAPACITY_TOKENS,
    } <= set(model.gauges)
    e2e = model.histograms[s.LATENCY_E2E]
    assert e2e.buckets[-1] == (math.inf, e2e.count)
    assert all(a[1] <= b[1] for a, b in zip(e2e.buckets, e2e.buckets[1:], strict=False))


def test_counters_only_go_up_until_a_restart() -> None:
    sim = EngineSim(SCENARIOS["restart"], start_time=0.0)
    previous = 0.0
    drops = 0
    for t in range(1, 150):
        sim.advance(float(t))
        if sim.generation_tokens_total < previous:
            drops += 1
        previous = sim.generation_tokens_total
    assert drops == 2  # restarts at 60 s and 120 s


def test_normal_is_healthy() -> None:
    sim = run("normal", 180)
    assert 0.3 <= sim.kv_usage <= 0.6
    assert sim.waiting < 10
    assert sim.preemptions_total == 0
    assert all(0.8 <= sim.gpu_utilization(g) <= 0.95 for g in range(2))
    assert max(skew(row) or 0 for row in sim.expert_counts) < 0.2


def test_kv_pressure_crosses_95_percent_with_preemptions_and_a_long_queue() -> None:
    sim = EngineSim(SCENARIOS["kv_pressure"], start_time=0.0)
    peak = 0.0
    for t in range(1, 121):
        sim.advance(float(t))
        peak = max(peak, sim.kv_usage)
    assert peak > 0.95
    assert sim.waiting > 100
    assert sim.preemptions_total > 0
    assert sim.gpu_memory_used_bytes(0) / SCENARIOS["kv_pressure"].gpu_memory_total_bytes > 0.95


def test_slow_engine_puts_p95_e2e_past_30_seconds() -> None:
    sim = run("slow_engine", 240)
    under_30 = sum(
        count for bound, count in zip(sim.e2e.bounds, sim.e2e.counts, strict=True) if bound <= 30
    )
    assert sim.e2e.total > 10
    assert under_30 / sim.e2e.total < 0.05


def test_hot_expert_skews_one_layer_collapses_another_and_heats_one_gpu() -> None:
    sim = run("hot_expert", 60)
    scenario = SCENARIOS["hot_expert"]
    assert scenario.hot_expert == (3, 5)
    assert (skew(sim.expert_counts[3]) or 0) > 0.5
    shares = token_shares(sim.expert_counts[17], scenario.top_k)
    assert shares is not None
    assert shares[2] > 0.40
    assert (skew(sim.expert_counts[0]) or 0) < 0.2
    # every token visits top_k experts in every layer
    assert all(sum(row) == sum(sim.expert_counts[0]) for row in sim.expert_counts)
    assert abs(sim.gpu_utilization(1) - sim.gpu_utilization(0)) > 0.5
