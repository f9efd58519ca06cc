"""The simulated engine: real-looking expositions, scenarios that show what they promise, and an
HTTP server whose fault knobs misbehave on demand."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import statistics
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe_watch import samples as s
from moe_watch.demo.exposition import FLAVORS, Flavor, render_exposition
from moe_watch.demo.scenarios import GIB, SCENARIOS, Scenario
from moe_watch.demo.simulated_engine import EngineSim, SimHistogram
from moe_watch.demo.simulated_engine_server import SimServer, start_engine_server
from moe_watch.signals.experts import skew, token_shares
from moe_watch.signals.power_bins import BINS, bin_index
from moe_watch.sources.exposition import parse_engine_exposition
from tests.conftest import FIXTURES, read_capture

KIND: dict[Flavor, str] = {"vllm": "vllm", "vllm_legacy": "vllm", "sglang": "sglang"}


def run(scenario: str | Scenario, seconds: int, seed: int = 0) -> EngineSim:
    """A simulation advanced one second at a time, as a 1 s scrape interval would."""
    sim = EngineSim(
        SCENARIOS[scenario] if isinstance(scenario, str) else scenario, seed=seed, start_time=0.0
    )
    for t in range(1, seconds + 1):
        sim.advance(float(t))
    return sim


def quantile(histogram: SimHistogram, q: float) -> float:
    """Upper bound of the (vLLM layout) bucket holding the q-quantile; inf past the last bound."""
    for le, running in histogram.cumulative():
        if running >= q * histogram.count and running > 0:
            return float(le)
    return math.inf


def share_at_most(histogram: SimHistogram, bound: float) -> float:
    """Share of the observations <= ``bound`` (a bound of the vLLM layout)."""
    running = dict(histogram.cumulative())[repr(bound)]
    return running / histogram.count if histogram.count else 0.0


def samples_by_name(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def counter_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every counter sample and histogram _count/_bucket, keyed by name and labels."""
    values = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_total", "_count", "_bucket")):
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


# -- the exposition --------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_same_seed_and_times_render_the_same_text(flavor: Flavor) -> None:
    assert render_exposition(run("normal", 30), flavor) == render_exposition(
        run("normal", 30), flavor
    )
    assert render_exposition(run("normal", 30, seed=1), flavor) != render_exposition(
        run("normal", 30), flavor
    )


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_flavor_parses_with_prometheus_and_the_agent(flavor: Flavor) -> None:
    sim = run("normal", 60)
    text = render_exposition(sim, flavor)
    families = list(text_string_to_metric_families(text))
    histograms = [f for f in families if f.type == "histogram"]
    assert len(histograms) >= 4
    for family in histograms:  # cumulative buckets, +Inf == _count
        buckets = [x.value for x in family.samples if x.name.endswith("_bucket")]
        (count,) = [x.value for x in family.samples if x.name.endswith("_count")]
        assert buckets == sorted(buckets), family.name
        assert buckets[-1] == count > 0, family.name

    parsed = parse_engine_exposition(text, KIND[flavor])
    assert parsed.dropped_samples == 0
    (model,) = parsed.models
    assert model.model == "mixtral-8x7b"
    assert set(s.LATENCY_KINDS) <= set(model.histograms)
    for key in (s.COUNTER_GENERATION_TOKENS, s.COUNTER_PROMPT_TOKENS, s.COUNTER_PREEMPTIONS):
        assert key in model.counters
    assert model.counters[s.COUNTER_REQUESTS_FINISHED] == sim.requests_finished_total > 0
    assert model.gauges[s.GAUGE_KV_CACHE_USAGE] == pytest.approx(sim.kv_usage)
    assert model.gauges[s.GAUGE_REQUESTS_RUNNING] == sim.running
    scenario = SCENARIOS["normal"]
    assert model.gauges[s.GAUGE_KV_CACHE_CAPACITY_TOKENS] == sim.capacity_tokens == 2048 * 16
    if flavor != "sglang":
        assert parsed.info["num_gpu_blocks"] == str(scenario.num_gpu_blocks)
        assert parsed.info["gpu_memory_utilization"] == "0.9"
        assert parsed.info["enable_prefix_caching"] == "True"


def test_vllm_exposition_has_the_names_help_labels_and_buckets_of_the_real_capture() -> None:
    real = {f.name: f for f in text_string_to_metric_families(read_capture("busy"))}
    sim = {f.name: f for f in text_string_to_metric_families(render_exposition(run("normal", 60)))}
    for name, family in sim.items():
        assert name in real, name
        assert (family.type, family.documentation) == (real[name].type, real[name].documentation)
        real_keys = {(x.name, frozenset(x.labels)) for x in real[name].samples}
        assert {(x.name, frozenset(x.labels)) for x in family.samples} == real_keys, name
    for name in (
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_queue_time_seconds",
    ):
        bounds = [x.labels["le"] for x in sim[name].samples if x.name.endswith("_bucket")]
        assert bounds == [x.labels["le"] for x in real[name].samples if x.name.endswith("_bucket")]
    # Token-count layouts follow max_model_len, as vLLM's do: the capture ran with 1024.
    short = run(replace(SCENARIOS["normal"], max_model_len=1024, prompt_tokens=(100, 600)), 30)
    ours = {f.name: f for f in text_string_to_metric_families(render_exposition(short))}
    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens"):
        assert [x.labels.get("le") for x in ours[name].samples] == [
            x.labels.get("le") for x in real[name].samples
        ]


def test_legacy_flavor_uses_the_pre_rename_names() -> None:
    names = set(samples_by_name(render_exposition(run("normal", 30), "vllm_legacy")))
    for old in (
        "vllm:gpu_cache_usage_perc",
        "vllm:gpu_prefix_cache_queries_total",
        "vllm:gpu_prefix_cache_hits_total",
        "vllm:time_per_output_token_seconds_count",
    ):
        assert old in names
    for new in (
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:inter_token_latency_seconds_count",
    ):
        assert new not in names


def test_sglang_flavor_uses_sglang_bucket_layouts_and_no_vllm_names() -> None:
    text = render_exposition(run("normal", 60), "sglang")
    assert "vllm:" not in text
    ttft = [
        labels["le"]
        for labels, _ in samples_by_name(text)["sglang:time_to_first_token_seconds_bucket"]
    ]
    assert ttft[:3] == ["0.1", "0.2", "0.4"]
    assert ttft[-1] == "+Inf"


def test_render_rejects_an_unknown_flavor() -> None:
    with pytest.raises(ValueError, match="unknown flavor"):
        render_exposition(run("normal", 1), "tgi")  # type: ignore[arg-type]


# -- counters and time -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["normal", "kv_pressure"])
def test_counters_and_histograms_never_drop_without_a_restart(name: str) -> None:
    sim = EngineSim(SCENARIOS[name], start_time=0.0)
    previous = counter_values(render_exposition(sim))
    rose = 0
    for t in range(5, 181, 5):
        sim.advance(float(t))
        current = counter_values(render_exposition(sim))
        assert all(current[key] >= value for key, value in previous.items()), t
        rose += current != previous
        previous = current
    assert rose >= 30


def test_the_restart_scenario_drops_every_counter_each_period() -> None:
    sim = EngineSim(SCENARIOS["restart"], start_time=0.0)
    drops = []
    previous = sim.generation_tokens_total
    for t in range(1, 150):
        sim.advance(float(t))
        if sim.generation_tokens_total < previous:
            drops.append(t)
        previous = sim.generation_tokens_total
    assert drops == [60, 120]
    assert sim.counters_started == 120.0


def test_reset_counters_zeroes_counters_and_histograms_like_an_engine_restart() -> None:
    sim = run("normal", 60)
    assert sim.generation_tokens_total > 0
    sim.reset_counters()
    values = counter_values(render_exposition(sim))
    assert values
    assert set(values.values()) == {0.0}
    sim.advance(120.0)  # and it serves again
    assert sim.generation_tokens_total > 0


def test_time_going_back_changes_nothing_and_a_long_gap_is_skipped_not_replayed() -> None:
    sim = run("normal", 30)
    before = render_exposition(sim)
    sim.advance(10.0)
    assert render_exposition(sim) == before
    finished = sim.requests_finished_total
    sim.advance(1e7)  # ~4 months: the clock catches up, but only the last 10 minutes are run
    assert sim.now == pytest.approx(1e7, abs=0.25)
    replayed = sim.requests_finished_total - finished
    assert 0.5 * 600 * 2.0 < replayed < 1.5 * 600 * 2.0  # arrivals at 2/s for 600 s


def test_latency_histograms_add_up_like_the_after_load_capture() -> None:
    """Once the load drains, as in after-load.prom: every request has one TTFT, queue and e2e
    observation; ITL has one per token after the first (19185 + 95 == 19280 there); e2e is TTFT +
    decode (the ITL sum); TTFT includes the queue time."""
    sim = run("normal", 120)
    sim.scenario = replace(sim.scenario, arrival_rate=1e-9)  # no new arrivals: the batch drains
    sim.advance(240.0)
    assert sim.running == sim.waiting == 0
    finished = sim.requests_finished_total
    assert finished > 100
    assert sim.e2e.count == sim.ttft.count == sim.queue.count == finished
    assert (
        sim.itl.count + finished == sim.generation_tokens_total == sim.request_generation_tokens.sum
    )
    assert sim.e2e.sum == pytest.approx(sim.ttft.sum + sim.itl.sum)
    prefill_floor = finished * SCENARIOS["normal"].ttft_seconds * 0.8  # the shortest prefill
    assert sim.ttft.sum > sim.queue.sum + prefill_floor


def test_a_long_queue_shows_in_ttft_not_only_in_queue_time() -> None:
    sim = run("kv_pressure", 120)
    assert quantile(sim.queue, 0.5) > 30
    assert quantile(sim.ttft, 0.5) > 30  # a prefill alone takes < 1 s


# -- scenarios -------------------------------------------------------------------------------
def test_normal_is_healthy() -> None:
    sim = EngineSim(SCENARIOS["normal"], start_time=0.0)
    kv: list[float] = []
    util: list[float] = []
    memory: list[float] = []
    for t in range(1, 301):
        sim.advance(float(t))
        if t > 60:
            kv.append(sim.kv_usage)
            util.extend(sim.gpu_utilization(g) for g in range(2))
            memory.append(sim.gpu_memory_used_bytes(0) / (80 * GIB))
            assert sim.waiting < 20
    assert 0.3 <= statistics.mean(kv) <= 0.6
    assert 0.8 <= statistics.mean(util) <= 0.95
    assert 0.85 <= statistics.mean(memory) <= 0.92
    assert sim.prefix_hit_ratio == pytest.approx(0.5, abs=0.05)
    assert 1.0 < quantile(sim.e2e, 0.95) <= 10.0
    assert sim.preemptions_total == 0
    assert max(skew(row) or 0 for row in sim.expert_counts) < 0.2


def test_kv_pressure_crosses_97_percent_with_preemptions_and_a_long_queue() -> None:
    sim = EngineSim(SCENARIOS["kv_pressure"], start_time=0.0)
    peak = 0.0
    for t in range(1, 121):
        sim.advance(float(t))
        peak = max(peak, sim.kv_usage)
    assert peak > 0.97
    assert sim.waiting > 100
    assert sim.preemptions_total > 0
    assert sim.gpu_memory_used_bytes(0) / SCENARIOS["kv_pressure"].gpu_memory_total_bytes > 0.95


def test_the_waiting_queue_is_capped_and_rejections_are_exported() -> None:
    scenario = replace(SCENARIOS["kv_pressure"], max_waiting=50)
    sim = run(scenario, 120)
    assert sim.rejected_total > 0
    assert sim.waiting <= 50 + scenario.max_num_seqs  # preempted requests go back in front
    rejected = samples_by_name(render_exposition(sim))["vllm:admission_rejections_total"]
    assert (
        {"model_name": "mixtral-8x7b", "reason": "max_num_queued_reqs"},
        sim.rejected_total,
    ) in rejected


def test_slow_engine_puts_p95_e2e_past_30_seconds_and_ttft_in_seconds() -> None:
    sim = run("slow_engine", 300)
    assert sim.e2e.count >= 10
    assert share_at_most(sim.e2e, 30.0) < 0.05
    assert quantile(sim.ttft, 0.5) >= 1.0
    assert share_at_most(run("normal", 300).e2e, 30.0) == 1.0


def test_hot_expert_skews_one_layer_collapses_another_and_heats_one_gpu() -> None:
    scenario = SCENARIOS["hot_expert"]
    sim = EngineSim(scenario, start_time=0.0)
    hot: list[float] = []
    cold: list[float] = []
    for t in range(1, 121):
        sim.advance(float(t))
        if t > 30:
            hot.append(sim.gpu_utilization(1))  # expert 5 of 8 lives on GPU 1 of 2
            cold.append(sim.gpu_utilization(0))
    assert scenario.hot_expert == (3, 5)
    assert sim.gpu_of_expert(5) == 1
    assert statistics.mean(hot) > 0.85  # ~0.90 in the long run, at the 0.99 cap at peaks
    assert statistics.mean(cold) < 0.35
    assert min(h - c for h, c in zip(hot, cold, strict=True)) > 0.45
    assert statistics.mean(h - c for h, c in zip(hot, cold, strict=True)) > 0.5
    assert (skew(sim.expert_counts[3]) or 0) > 0.5
    shares = token_shares(sim.expert_counts[17], scenario.top_k)
    assert shares is not None
    assert shares[2] > 0.40
    assert (skew(sim.expert_counts[0]) or 0) < 0.2
    assert all(sum(row) == sum(sim.expert_counts[0]) for row in sim.expert_counts)


def test_hot_expert_flip_alternates_the_hottest_while_a_short_window_stays_skewed() -> None:
    """What the paging e2e test leans on: over a 6 s window sampled every second, layer 3's
    hottest expert alternates 5 <-> 2 while its skew stays > 0.5 and no expert collapses."""
    scenario = SCENARIOS["hot_expert_flip"]
    sim = EngineSim(scenario, start_time=0.0)
    rows: list[list[int]] = []
    hottest, skews, top_shares = [], [], []
    for t in range(1, 91):
        sim.advance(float(t))
        rows.append(list(sim.expert_counts[3]))
        if t > 6:
            window = [now - then for now, then in zip(rows[-1], rows[-7], strict=True)]
            hottest.append(window.index(max(window)))
            skews.append(skew(window) or 0.0)
            top_shares.append(max(token_shares(window, scenario.top_k) or [0.0]))
    flips = sum(a != b for a, b in itertools.pairwise(hottest))
    assert set(hottest) == {5, 2}
    assert flips >= 5  # every 12 s
    assert min(skews) > 0.6
    assert max(top_shares) < 0.36  # collapse is > 0.40
    assert (skew(sim.expert_counts[0]) or 0) < 0.2


def test_a_flip_needs_its_period_and_a_hot_expert() -> None:
    with pytest.raises(ValueError, match="hot_flip_expert"):
        replace(SCENARIOS["normal"], hot_flip_expert=2, hot_flip_every_seconds=10.0)
    with pytest.raises(ValueError, match="hot_flip_expert"):
        replace(SCENARIOS["hot_expert"], hot_flip_expert=2)
    with pytest.raises(ValueError, match="hot_flip_expert"):
        replace(SCENARIOS["hot_expert"], hot_flip_expert=8, hot_flip_every_seconds=10.0)


def test_gpu_lost_is_normal_traffic_plus_a_gpu_1_loss_time() -> None:
    assert SCENARIOS["gpu_lost"].gpu_lost_after_seconds == 10.0
    others = [x for name, x in SCENARIOS.items() if name != "gpu_lost"]
    assert all(x.gpu_lost_after_seconds is None for x in others)
    assert render_exposition(run("gpu_lost", 60)) == render_exposition(run("normal", 60))


def test_batch_peak_sweeps_the_batch_and_its_tokens_per_second_peak_at_8() -> None:
    scenario = SCENARIOS["batch_peak"]
    sim = EngineSim(scenario, start_time=0.0)
    phases: dict[int, tuple[float, float, float]] = {}
    tokens, steps = 0, 0
    for index, concurrency in enumerate(scenario.concurrency_sweep):
        for t in range(1, 91):  # 1 s scrapes through the phase
            sim.advance(index * 90.0 + t - 0.01)
            assert sim.running + sim.waiting <= concurrency  # a closed loop, never more
        made = sim.generation_tokens_total - tokens
        taken = sim.iteration_tokens.count - steps
        phases[concurrency] = (made / 90.0, made / taken, sim._itl())
        tokens, steps = sim.generation_tokens_total, sim.iteration_tokens.count
    rates = {c: rate for c, (rate, _, _) in phases.items()}
    assert max(rates, key=rates.__getitem__) == 8
    assert rates[8] > 1.1 * max(rates[4], rates[16])  # a clear peak, not noise
    for concurrency, (_, batch, _) in phases.items():  # tokens per step: the batch
        assert batch <= concurrency, (concurrency, batch)
        assert BINS[bin_index(batch) or 0] == concurrency, (concurrency, batch)
    assert phases[16][2] < 0.2 < phases[32][2]  # batch 32 is past the ITL SLO


def coverage_truth(sim: EngineSim) -> dict[int, float]:
    """The simulated plugin's observed coverage per bin label (its expectations)."""
    layers, experts = sim.scenario.num_layers, sim.scenario.num_experts
    return {
        2**b: sum(sim.coverage_distinct[b]) / (steps * layers * experts)
        for b, steps in enumerate(sim.coverage_steps)
        if steps
    }


def test_batch_peak_knows_its_coverage_decode_is_independent_prefill_is_local() -> None:
    sim = EngineSim(SCENARIOS["batch_peak"], start_time=0.0)
    sim.advance(540.0)
    truth = coverage_truth(sim)
    assert set(truth) == {1, 2, 4, 8, 16, 32, 128, 256, 512}  # decode batches and prompts
    mean_tokens = {2**b: sim.coverage_tokens[b] / n for b, n in enumerate(sim.coverage_steps) if n}
    for tokens_bin in (1, 2, 4, 8, 16, 32):  # one token per request: independent tokens
        independent = 1 - (1 - 2 / 64) ** mean_tokens[tokens_bin]
        assert truth[tokens_bin] == pytest.approx(independent, abs=0.02), tokens_bin
    for tokens_bin in (128, 256):  # one prompt's tokens keep to its home experts
        assert truth[tokens_bin] < 1 - (1 - 2 / 64) ** mean_tokens[tokens_bin] - 0.1
    dense = min(b for b, value in truth.items() if value >= 0.9)
    assert dense == 512
    assert truth[256] < 0.88
    assert truth[512] > 0.93
    # One engine step in 4 is sampled (decode steps, and each prompt's prefill).
    assert sum(sim.coverage_steps) == -(-sim.engine_steps // 4)
    assert sim.engine_steps > sim.iteration_tokens.count  # the prefills are steps too


def test_every_scenario_is_named_after_its_key_and_described() -> None:
    assert {"normal", "kv_pressure", "slow_engine", "hot_expert", "restart", "gpu_lost"} <= set(
        SCENARIOS
    )
    for name, scenario in SCENARIOS.items():
        assert scenario.name == name
        assert scenario.description
        # Mixtral's shape; hot_expert_flip needs 16 experts to flip without collapse (its
        # comment), batch_peak 64 so that decode batches up to 32 stay short of the dense point
        experts = {"hot_expert_flip": 16, "batch_peak": 64}.get(name, 8)
        assert (scenario.num_experts, scenario.top_k, scenario.gpu_count) == (experts, 2, 2)


def test_a_scenario_outside_the_model_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="hot_expert"):
        replace(SCENARIOS["normal"], hot_expert=(3, 8))
    with pytest.raises(ValueError, match="prompt_tokens"):
        replace(SCENARIOS["normal"], prompt_tokens=(10, 5))
    with pytest.raises(ValueError, match="KV cache must hold max_model_len"):
        replace(SCENARIOS["normal"], num_gpu_blocks=1024)  # 16384 tokens < 32768
    with pytest.raises(ValueError, match="fit in max_model_len"):
        replace(SCENARIOS["normal"], max_model_len=2048)
    with pytest.raises(IndexError):
        run("normal", 1).gpu_utilization(2)


def test_models_json_has_the_shape_of_vllm_v1_models() -> None:
    real = json.loads((FIXTURES / "vllm" / "v1-models.json").read_text())
    ours = EngineSim(SCENARIOS["normal"], model_name="m", start_time=1_700_000_000.5).models_json()
    assert set(ours) == set(real)
    entry = ours["data"][0]  # type: ignore[index]
    assert set(entry) == set(real["data"][0])
    assert (entry["id"], entry["max_model_len"], entry["created"]) == ("m", 32768, 1_700_000_000)
    assert set(entry["permission"][0]) == set(real["data"][0]["permission"][0])


# -- the HTTP server -------------------------------------------------------------------------
@pytest.fixture
async def served() -> AsyncIterator[tuple[SimServer, list[float]]]:
    clock = [60.0]
    server = await start_engine_server(
        EngineSim(SCENARIOS["normal"], start_time=0.0), clock=lambda: clock[0]
    )
    try:
        yield server, clock
    finally:
        await asyncio.wait_for(server.stop(), 10)


async def get(
    url: str, timeout: float = 10.0, check: Callable[[aiohttp.ClientResponse], None] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as response,
    ):
        if check is not None:
            check(response)
        return response.status, dict(response.headers), await response.read()


async def test_the_server_answers_metrics_models_version_and_health(
    served: tuple[SimServer, list[float]],
) -> None:
    server, clock = served
    assert server.url.startswith("http://127.0.0.1:")
    status, headers, body = await get(server.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    first = parse_engine_exposition(body.decode(), "vllm").models[0]
    clock[0] += 30.0  # the next scrape advances the simulation to the clock
    second = parse_engine_exposition((await get(server.url + "/metrics"))[2].decode()).models[0]
    tokens = s.COUNTER_GENERATION_TOKENS
    assert second.counters[tokens] > first.counters[tokens] > 0
    assert server.scrapes == 2
    assert server.sim.now == 90.0

    status, _, body = await get(server.url + "/v1/models")
    assert status == 200
    assert json.loads(body) == server.sim.models_json()
    assert json.loads((await get(server.url + "/version"))[2]) == {"version": "0.32.0"}
    assert (await get(server.url + "/health"))[0] == 200
    assert server.scrapes == 2  # only /metrics counts


async def test_the_server_speaks_sglang_when_asked(served: tuple[SimServer, list[float]]) -> None:
    server, _ = served
    server.flavor = "sglang"
    body = (await get(server.url + "/metrics"))[2].decode()
    assert parse_engine_exposition(body).kind == "sglang"


async def test_fail_status_garbage_and_truncation(served: tuple[SimServer, list[float]]) -> None:
    server, _ = served
    server.fail_status = 503
    assert (await get(server.url + "/metrics"))[0] == 503
    assert (await get(server.url + "/v1/models"))[0] == 200  # metadata stays healthy
    server.fail_status = None

    server.garbage = b"\x00\xff not an exposition"
    assert (await get(server.url + "/metrics"))[2] == b"\x00\xff not an exposition"
    server.garbage = None

    server.truncate_at = 700
    body = (await get(server.url + "/metrics"))[2]
    assert body == render_exposition(server.sim).encode()[:700]  # the clock stood still: same state
    assert not body.endswith(b"\n")
    server.truncate_at = None
    assert (await get(server.url + "/metrics"))[2] == render_exposition(server.sim).encode()


async def test_a_huge_body_is_streamed_chunked_without_a_length(
    served: tuple[SimServer, list[float]],
) -> None:
    server, _ = served
    server.huge_body_bytes = 3 * 1024 * 1024 + 5

    def no_length(response: aiohttp.ClientResponse) -> None:
        assert response.content_length is None
        assert response.headers.get("Transfer-Encoding") == "chunked"

    status, _, body = await get(server.url + "/metrics", check=no_length)
    assert status == 200
    assert len(body) == server.huge_body_bytes
    assert all(line.startswith(b"# ") for line in body.split(b"\n")[:-1])

    # A client that stops reading at its cap hangs up; the server carries on.
    async with aiohttp.ClientSession() as session, session.get(server.url + "/metrics") as response:
        assert len(await response.content.readexactly(64 * 1024)) == 64 * 1024
    server.huge_body_bytes = None
    assert (await get(server.url + "/metrics"))[0] == 200


async def test_a_delay_slows_answers_and_a_hanging_one_does_not_hold_up_stop() -> None:
    server = await start_engine_server(EngineSim(SCENARIOS["normal"], start_time=0.0))
    server.delay_seconds = 0.05
    assert (await get(server.url + "/metrics"))[0] == 200  # slow, but it answers
    server.delay_seconds = 300.0
    with pytest.raises(asyncio.TimeoutError):
        await get(server.url + "/metrics", timeout=0.3)
    assert server.scrapes == 2  # the second request arrived and is being held
    await asyncio.wait_for(server.stop(), 10)  # releases the held answer instead of waiting 300 s
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(server.url + "/metrics")


async def test_reset_counters_through_the_server(served: tuple[SimServer, list[float]]) -> None:
    server, _ = served
    before = parse_engine_exposition((await get(server.url + "/metrics"))[2].decode()).models[0]
    assert before.counters[s.COUNTER_PROMPT_TOKENS] > 0
    server.reset_counters()
    after = parse_engine_exposition((await get(server.url + "/metrics"))[2].decode()).models[0]
    assert after.counters[s.COUNTER_PROMPT_TOKENS] == 0
    assert after.histograms[s.LATENCY_E2E].count == 0
