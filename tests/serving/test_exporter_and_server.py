"""The exporter renders a Snapshot to the metric contract; the server never answers 500."""

from __future__ import annotations

import gzip
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from moe_watch.samples import GpuSample, Histogram
from moe_watch.serving.exporter import build_registry
from moe_watch.serving.server import make_app, start_server
from moe_watch.serving.views import status_document
from moe_watch.signals.batching import BatchAnswer, BatchPoint
from moe_watch.signals.coverage import CoverageBin, CoverageCurve
from moe_watch.signals.engine import EngineSignals
from moe_watch.snapshot import EngineRecord, EngineView, GpuView, Snapshot
from moe_watch.sources.runner import SourceStatus

GIB = 1024**3


def snapshot() -> Snapshot:
    hot = GpuSample(
        0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", True, 0.95, 72 * GIB, 80 * GIB, 71.0, 610.5, (4242,)
    )
    lost = GpuSample(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3", False)
    signals = EngineSignals(
        requests_running=8,
        requests_waiting=52,
        kv_cache_usage_ratio=0.97,
        kv_cache_hit_ratio=0.25,
        kv_cache_free_tokens=300.0,
        kv_cache_capacity_tokens=10_000.0,
        preemptions_per_second=0.5,
        generation_tokens_per_second=120.0,
        latency_seconds={("e2e", 0.95): 31.5, ("ttft", 0.5): 0.25},
        histograms={
            "e2e": Histogram(((1.0, 3.0), (30.0, 9.0), (math.inf, 10.0)), 10.0, 42.5),
            "request_prompt_tokens": Histogram(((100.0, 4.0), (math.inf, 10.0)), 10.0, 2000.0),
        },
        requests_finished={"stop": 9.0, "error": 1.0},
    )
    return Snapshot(
        timestamp=1_700_000_000.0,
        cycle=7,
        cycle_duration_seconds=0.012,
        sources=(
            SourceStatus("nvml", True, 0.004, 1_700_000_000.0, {"gpu_lost": 3}, None),
            SourceStatus("engine:mixtral-0", True, 0.008, 1_700_000_000.0, {}, None),
        ),
        engines=(
            EngineRecord(
                "mixtral-0",
                up=True,
                views=(EngineView("mixtral-0", "mixtral-8x7b", "vllm", "0.32.0", signals, 32768),),
                gpu_spread=0.65,
                batching={"mixtral-8x7b": batch_answer()},
            ),
        ),
        gpus=(GpuView(hot, "mixtral-0", 0.9), GpuView(lost, "mixtral-0", None)),
        driver_version="570.133.20",
        xid_totals={(1, 79): 2},
        node_gpu_spread=0.65,
    )


def batch_answer(knee: int | None = 8) -> BatchAnswer:
    """Batches 4, 8 and 16 seen; 8 is the peak within the SLO."""
    points = (
        BatchPoint(4, 900.0, 60.0, 0.04, 0.3, True, True),
        BatchPoint(8, 1200.0, 95.0, 0.07, 0.5, True, True),
        BatchPoint(16, 600.0, 90.0, 0.25, None, True, False),
    )
    return BatchAnswer(points, knee, knee is not None, "", 2, 0.2, 300.0)


def render(
    get: Callable[[], Snapshot | None],
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(build_registry(get)).decode()
    samples: list[Sample] = [
        s for family in text_string_to_metric_families(text) for s in family.samples
    ]
    return {(s.name, frozenset(s.labels.items())): s.value for s in samples}


def test_every_contract_family_of_the_agent_core_is_rendered_with_its_values() -> None:
    m = render(snapshot)
    engine = {("engine", "mixtral-0"), ("model", "mixtral-8x7b")}

    def at(name: str, *extra: tuple[str, str]) -> float:
        return m[("moe_watch_" + name, frozenset(engine | set(extra)))]

    assert at("requests_waiting") == 52
    assert at("kv_cache_usage_ratio") == 0.97
    assert at("kv_cache_hit_ratio") == 0.25
    assert at("kv_cache_free_tokens") == 300
    assert at("preemptions_per_second") == 0.5
    assert at("generation_tokens_per_second") == 120
    assert at("engine_max_model_len_tokens") == 32768
    assert (
        at(
            "engine_info",
            ("kind", "vllm"),
            ("version", "0.32.0"),
            ("k8s_namespace_name", ""),
            ("k8s_pod_name", ""),
        )
        == 1
    )
    gpu0 = {("gpu", "0"), ("engine", "mixtral-0")}
    assert m[("moe_watch_gpu_utilization_ratio", frozenset(gpu0))] == 0.95
    assert m[("moe_watch_gpu_memory_used_bytes", frozenset(gpu0))] == 72 * GIB
    assert m[("moe_watch_gpu_memory_used_ratio", frozenset(gpu0))] == 0.9
    assert m[("moe_watch_gpu_power_watts", frozenset(gpu0))] == 610.5
    assert m[("moe_watch_gpu_up", frozenset({("gpu", "1"), ("engine", "mixtral-0")}))] == 0
    assert m[("moe_watch_gpu_xid_errors_total", frozenset({("gpu", "1"), ("xid", "79")}))] == 2
    assert (
        m[("moe_watch_engine_gpu_utilization_spread_ratio", frozenset({("engine", "mixtral-0")}))]
        == 0.65
    )
    assert (
        m[
            (
                "moe_watch_collect_errors_total",
                frozenset({("source", "nvml"), ("reason", "gpu_lost")}),
            )
        ]
        == 3
    )
    assert m[("moe_watch_target_up", frozenset({("engine", "mixtral-0")}))] == 1
    info = next(
        labels for name, labels in m if name == "moe_watch_gpu_info" and ("gpu", "0") in labels
    )
    assert dict(info)["driver_version"] == "570.133.20"
    assert dict(info)["uuid"] == "GPU-aaaa"


def test_engine_histograms_are_republished_as_counters_by_engine_and_model() -> None:
    text = generate_latest(build_registry(snapshot)).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    e2e = families["moe_watch_e2e_request_latency_seconds"]
    assert e2e.type == "histogram"
    key = {"engine": "mixtral-0", "model": "mixtral-8x7b"}
    got = {(x.name, x.labels.get("le")): x.value for x in e2e.samples}
    assert all(x.labels.keys() - {"le"} == key.keys() for x in e2e.samples)
    assert got == {
        ("moe_watch_e2e_request_latency_seconds_bucket", "1.0"): 3.0,
        ("moe_watch_e2e_request_latency_seconds_bucket", "30.0"): 9.0,
        ("moe_watch_e2e_request_latency_seconds_bucket", "+Inf"): 10.0,
        ("moe_watch_e2e_request_latency_seconds_count", None): 10.0,
        ("moe_watch_e2e_request_latency_seconds_sum", None): 42.5,
    }
    prompt = families["moe_watch_request_prompt_tokens"]
    assert prompt.type == "histogram"
    assert {x.labels.get("le"): x.value for x in prompt.samples if x.name.endswith("_bucket")} == {
        "100.0": 4.0,
        "+Inf": 10.0,
    }
    finished = families["moe_watch_requests_finished"]
    assert finished.type == "counter"
    assert {x.labels["finished_reason"]: x.value for x in finished.samples} == {
        "stop": 9.0,
        "error": 1.0,
    }
    # kinds the engine did not publish are absent, never zero-filled
    assert not families["moe_watch_time_to_first_token_seconds"].samples
    # the window quantiles moved to /status: Prometheus computes them from the buckets
    assert "moe_watch_latency_seconds" not in families


def test_status_shows_the_window_latency_quantiles() -> None:
    engines = status_document(snapshot())["engines"]
    assert engines[0]["latency_seconds"] == {"e2e": {"0.95": 31.5}, "ttft": {"0.5": 0.25}}


def test_unknown_values_are_absent_not_zero() -> None:
    m = render(snapshot)
    lost = frozenset({("gpu", "1"), ("engine", "mixtral-0")})
    assert ("moe_watch_gpu_utilization_ratio", lost) not in m
    assert ("moe_watch_gpu_memory_used_ratio", lost) not in m
    assert not any(name == "moe_watch_prompt_tokens_per_second" for name, _ in m)


def test_before_the_first_cycle_only_build_info_is_served() -> None:
    m = render(lambda: None)
    assert {name for name, _ in m} == {"moe_watch_build_info"}


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, dict[str, Snapshot | Exception | None]]]:
    state: dict[str, Snapshot | Exception | None] = {"snapshot": None}

    def get() -> Snapshot | None:
        current = state["snapshot"]
        if isinstance(current, Exception):
            raise current
        return current

    runner, url = await start_server(make_app(get), "127.0.0.1", 0)
    yield url, state
    await runner.cleanup()


async def test_readyz_waits_for_the_first_snapshot_and_healthz_is_always_ok(
    served: tuple[str, dict[str, Snapshot | Exception | None]],
) -> None:
    url, state = served
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "/readyz") as before:
            assert before.status == 503
        async with client.get(url + "/healthz") as alive:
            assert alive.status == 200
        state["snapshot"] = snapshot()
        async with client.get(url + "/readyz") as after:
            assert after.status == 200
        async with client.get(url + "/status") as status:
            body = await status.json()
    assert body["cycle"] == 7
    assert body["gpus"][1] == {
        "gpu": 1,
        "uuid": "GPU-bbbb",
        "name": "NVIDIA H100 80GB HBM3",
        "up": False,
        "engine": "mixtral-0",
        "utilization_ratio": None,
        "memory_used_ratio": None,
        "pids": [],
    }


async def test_a_rendering_failure_serves_the_last_good_body_never_500(
    served: tuple[str, dict[str, Snapshot | Exception | None]],
) -> None:
    url, state = served
    state["snapshot"] = snapshot()
    async with aiohttp.ClientSession() as client:
        async with client.get(url + "/metrics") as good:
            good_body = await good.text()
        state["snapshot"] = RuntimeError("a bug while rendering")
        async with client.get(url + "/metrics") as failed:
            assert failed.status == 200
            assert await failed.text() == good_body
    assert "moe_watch_gpu_up" in good_body


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text;version=1.0.0"])
async def test_a_rendering_failure_without_a_good_body_still_serves_a_series(
    served: tuple[str, dict[str, Snapshot | Exception | None]], accept: str
) -> None:
    # Before: 200 with an empty body, so nothing told Prometheus the node went blind.
    url, state = served
    state["snapshot"] = RuntimeError("a bug while rendering")
    async with (
        aiohttp.ClientSession() as client,
        client.get(url + "/metrics", headers={"Accept": accept}) as response,
    ):
        assert response.status == 200
        body = await response.text()
    assert "moe_watch_build_info{" in body
    assert 'moe_watch_render_failed{part="all"} 1.0' in body


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),  # what Prometheus sends
        ("deflate, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("", False),
    ],
)
async def test_metrics_are_gzipped_when_the_scraper_accepts_it(
    served: tuple[str, dict[str, Snapshot | Exception | None]], accept_encoding: str, gzipped: bool
) -> None:
    url, state = served
    state["snapshot"] = snapshot()
    bodies = []
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for encoding in ("identity", accept_encoding, accept_encoding):
            async with client.get(
                url + "/metrics", headers={"Accept-Encoding": encoding}
            ) as response:
                assert response.status == 200
                bodies.append((response.headers.get("Content-Encoding"), await response.read()))
    (plain_encoding, plain), (encoding, body), (_, again) = bodies
    assert plain_encoding is None
    assert b"moe_watch_gpu_up" in plain
    assert encoding == ("gzip" if gzipped else None)
    assert (gzip.decompress(body) if gzipped else body) == plain
    assert again == body  # one compression per snapshot, the same bytes for every scrape


async def test_openmetrics_is_negotiated_by_accept_header(
    served: tuple[str, dict[str, Snapshot | Exception | None]],
) -> None:
    url, state = served
    state["snapshot"] = snapshot()
    accept = "application/openmetrics-text;version=1.0.0"
    async with (
        aiohttp.ClientSession() as client,
        client.get(url + "/metrics", headers={"Accept": accept}) as response,
    ):
        body = await response.text()
        content_type = response.headers["Content-Type"]
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")
    assert math.isclose(
        float(
            next(
                line
                for line in body.splitlines()
                if line.startswith("moe_watch_cycle_duration_seconds ")
            ).split()[1]
        ),
        0.012,
    )


def deepseek_v3_snapshot(ep_size: int = 32, engine_group: str | None = None) -> Snapshot:
    """58 MoE layers x 256 experts, top-8, EP over 32 GPUs: the cardinality worst case."""
    from moe_watch.samples import ExpertCounts, matrix
    from moe_watch.signals.experts import derive_expert_signals, rank_tokens
    from moe_watch.snapshot import EngineExperts

    layers = tuple(range(3, 61))  # DeepSeek-V3: the first 3 layers are dense

    def counts(scale: int) -> ExpertCounts:
        rows = matrix(
            [float(scale * (1 + (e * 7 + layer) % 5)) for e in range(256)] for layer in layers
        )
        return ExpertCounts("dsv3", "deepseek-v3", 8, 256, layers, rows, ep_size=ep_size)

    from moe_watch.signals.eplb_whatif import eplb_whatif
    from moe_watch.snapshot import WhatIfView

    window = [counts(0), counts(10)]
    signals = derive_expert_signals(window)  # 4 load ranks
    whatif = eplb_whatif(signals.window_counts, layers, ep_size)
    view = EngineExperts(
        "dsv3",
        window[-1],
        signals,
        whatif=WhatIfView(whatif, 0.0, 0.0) if whatif is not None else None,
        engine_group=engine_group,
        group_rank_tokens=rank_tokens(signals.window_counts, 256, ep_size) if engine_group else (),
        coverage=CoverageCurve(  # sampled steps in every one of the 12 bins: the most series
            tuple(CoverageBin(2**b, 10.0, 2.0**b, min(1.0, 2**b / 64), 0.5) for b in range(12)),
            dense_point=64,
        ),
    )
    return Snapshot(
        timestamp=0.0,
        cycle=1,
        cycle_duration_seconds=0.0,
        sources=(),
        engines=(EngineRecord("dsv3", up=True, expert_source=True, experts=view),),
    )


def test_default_expert_export_for_a_deepseek_v3_engine_stays_under_700_series() -> None:
    snap = deepseek_v3_snapshot()
    text = generate_latest(build_registry(lambda: snap)).decode()
    expert_series = [
        s
        for family in text_string_to_metric_families(text)
        if family.name.startswith("moe_watch_expert")
        for s in family.samples
    ]
    # per layer: skew, balancedness, max share + 4 load ranks x (share, expert id); 32 EP ranks;
    # max skew, collapsed and observed layers; the EPLB what-if: balancedness today, 3 what-ifs,
    # redundant needed, its balancedness, searched max: 58 x 11 + 32 + 3 + 7 = 680; and the
    # coverage curve at most: 12 bins x (observed, independent, steps) + the dense point = 37
    # (docs/metrics.md)
    assert len(expert_series) == 58 * (3 + 2 * 4) + 32 + 3 + 7 + 12 * 3 + 1
    whatif = [
        s for s in expert_series if s.name == "moe_watch_expert_eplb_whatif_balancedness_ratio"
    ]
    assert sorted(s.labels["redundant_experts"] for s in whatif) == ["0", "32", "64"]
    assert not any(s.name == "moe_watch_expert_tokens_total" for s in expert_series)
    ranks = [s for s in expert_series if s.name == "moe_watch_expert_rank_load_ratio"]
    assert len(ranks) == 32
    full = generate_latest(build_registry(lambda: snap, expert_full_detail=True)).decode()
    assert full.count("moe_watch_expert_tokens_total{") == 58 * 256  # opt-in: every (layer, expert)


async def test_experts_endpoint_serves_the_whole_matrix() -> None:
    snap = deepseek_v3_snapshot()
    runner, url = await start_server(make_app(lambda: snap), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as client, client.get(url + "/experts") as response:
            body = await response.json()
    finally:
        await runner.cleanup()
    (engine,) = body["engines"]
    assert (engine["engine"], engine["top_k"], engine["num_experts"]) == ("dsv3", 8, 256)
    assert len(engine["counts_window"]) == 58
    assert all(len(row) == 256 for row in engine["counts_window"])
    assert engine["layers"][0] == 3
    assert len(engine["hot"]) == 10
    assert len(engine["rank_load"]) == 32


def test_the_batching_curve_and_coverage_are_rendered_per_bin_and_absent_when_unknown() -> None:
    m = render(snapshot)
    engine = {("engine", "mixtral-0"), ("model", "mixtral-8x7b")}

    def at(name: str, batch: str | None = None) -> float | None:
        labels = engine | ({("batch", batch)} if batch else set())
        return m.get(("moe_watch_" + name, frozenset(labels)))

    assert at("batch_generation_tokens_per_second_per_gpu", "8") == 95.0
    assert at("batch_itl_p95_seconds", "16") == 0.25
    assert at("batch_evidence_seconds", "4") == 900.0
    assert at("batch_ttft_p95_seconds", "16") is None  # no TTFT observed there: absent
    assert at("batch_generation_tokens_per_second_per_gpu", "32") is None  # never seen
    assert (at("batch_knee_requests"), at("batch_knee_peak_reached")) == (8, 1)

    def thin_snapshot() -> Snapshot:
        whole = snapshot()
        record = replace(whole.engines[0], batching={"mixtral-8x7b": batch_answer(None)})
        return replace(whole, engines=(record,))

    thin = render(thin_snapshot)
    assert ("moe_watch_batch_knee_requests", frozenset(engine)) not in thin
    assert ("moe_watch_batch_itl_p95_seconds", frozenset(engine | {("batch", "8")})) in thin

    dsv3 = render(deepseek_v3_snapshot)
    one = frozenset({("engine", "dsv3")})
    assert dsv3[("moe_watch_expert_dense_point_tokens", one)] == 64
    assert dsv3[("moe_watch_expert_coverage_ratio", one | {("tokens", "32")})] == 0.5
    assert dsv3[("moe_watch_expert_coverage_independent_ratio", one | {("tokens", "2048")})] == 0.5
    assert dsv3[("moe_watch_expert_coverage_steps", one | {("tokens", "1")})] == 10
