"""One node's cost: what a moe-watch cycle, a scrape and the process cost, for a node shape.

Simulated GPUs (fake NVML, the real NVML source), engines served over HTTP with the real 54 KB
vLLM capture, and plugin files with the model's MoE layers x experts per engine, with coverage
in all 12 tokens-per-step bins; a state file gives each engine a batching curve with evidence in
all 12 batch bins (the worst case of both curves' series). Runs the real agent for --cycles
cycles back to back, then 20 concurrent scrapers against its /metrics. Every figure has a
reference measured in the same run. The EPLB what-if (vLLM's EPLB on the window's load) runs in
the background every eplb_whatif_interval_seconds (default 60 s, so once every 12 cycles of
5 s): no cycle waits for it. Here the bench lets it finish between two timed cycles, as the 5 s
between cycles does in a real agent, and measures its cost per computation alone: typical (the
target reached early), skewed and worst case (the whole search range, no count reaching the
target).

Node shapes (--node, each value can be overridden):
- ``dsv3`` (default): 8 GPUs, 2 DeepSeek-V3 engines of 4 GPUs each, 58 x 256 experts, top-8,
  EP 32 (each engine spans several nodes; this node holds 4 of its 32 ranks).
- ``mixtral8``: 8 GPUs, 8 single-GPU Mixtral-8x7B engines (FP8 weights fit one 80 GB GPU),
  32 x 8 experts, top-2, no EP: the most engines an 8-GPU node runs, so the most expositions
  to scrape and parse and the most per-engine series.

    python bench/node.py [--node dsv3|mixtral8] [--cycles 10000] [--scrapes 2000]
    python bench/node.py --node mixtral8 --engines 4 --gpus-per-engine 2   # 4 x TP2
    python bench/node.py --profile 20   # cProfile of the timed cycles: the top 20 entries
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import multiprocessing
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.series_budget import engine_budget, node_budget  # noqa: E402
from moe_watch.agent import Agent  # noqa: E402
from moe_watch.agent.curve_state import FILE_NAME, save_curves  # noqa: E402
from moe_watch.config import load_settings  # noqa: E402
from moe_watch.demo.fake_nvml import FakeNvml  # noqa: E402
from moe_watch.demo.replay_server import ReplayServer  # noqa: E402
from moe_watch.demo.simulated_engine import ITL_BUCKETS, TTFT_BUCKETS  # noqa: E402
from moe_watch.expert_file import CountsFile, StepCoverage, write_counts_file  # noqa: E402
from moe_watch.malloc_tuning import fix_malloc_thresholds  # noqa: E402
from moe_watch.samples import Histogram  # noqa: E402
from moe_watch.serving.exporter import build_registry  # noqa: E402
from moe_watch.serving.server import make_app, start_server  # noqa: E402
from moe_watch.serving.service import freeze_startup_heap  # noqa: E402
from moe_watch.signals.batching import BatchCurve, IntervalEvidence, add_interval  # noqa: E402
from moe_watch.signals.power_bins import BINS  # noqa: E402

CAPTURES = ROOT / "tests" / "fixtures" / "vllm"  # data files only: no pytest needed
CAPTURE = CAPTURES / "vllm-0.32-cpu-tiny-mixtral.after-load.prom"


@dataclass(frozen=True)
class NodeShape:
    engines: int
    gpus_per_engine: int
    model: str
    layers: int  # MoE layers
    first_layer: int  # the model layer index of the first MoE layer
    experts: int
    top_k: int
    ep: int  # expert-parallel size (1: none)


NODES = {
    "dsv3": NodeShape(2, 4, "deepseek-v3", 58, 3, 256, 8, 32),
    "mixtral8": NodeShape(8, 1, "mixtral-8x7b", 32, 0, 8, 2, 1),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def write_experts(
    directory: Path, shape: NodeShape, step: int, rng: random.Random, now: float
) -> None:
    counts = [
        [step * 100 + rng.randint(0, 50) for _ in range(shape.experts)] for _ in range(shape.layers)
    ]
    layers = list(range(shape.first_layer, shape.first_layer + shape.layers))
    write_counts_file(
        directory / "worker.experts.json",
        CountsFile(pid=1, started=1.0, updated=now, model=shape.model, top_k=shape.top_k,
                   num_experts=shape.experts, layers=layers, counts=counts, ep_size=shape.ep,
                   coverage=full_coverage(shape, step)),
    )  # fmt: skip


def full_coverage(shape: NodeShape, step: int) -> StepCoverage:
    """Sampled steps in every one of the 12 tokens-per-step bins: the most coverage series."""
    steps = [step * 10] * len(BINS)
    return StepCoverage(
        bins=list(BINS), steps=steps, tokens=[n * b for n, b in zip(steps, BINS, strict=True)],
        distinct=[[min(shape.experts, b * shape.top_k) * n] * shape.layers
                  for n, b in zip(steps, BINS, strict=True)],
        sample_every=4,
    )  # fmt: skip


def full_curve(now: float) -> BatchCurve:
    """A batching curve with evidence in every one of its 12 bins, with vLLM's ITL and TTFT
    layouts: the most batching series an engine can export (the replayed capture never moves,
    so the agent restores this from its state file)."""
    curve = BatchCurve(updated=now)
    for index, batch in enumerate(BINS):

        def latency(bounds: tuple[float, ...]) -> Histogram:  # everything in the first bucket
            return Histogram((*((b, 100.0) for b in bounds), (float("inf"), 100.0)), 100.0, 1.0)

        evidence = IntervalEvidence(600.0, float(batch), 600.0 * 10 * (index + 1),
                                    itl=latency(ITL_BUCKETS), ttft=latency(TTFT_BUCKETS))  # fmt: skip
        curve = add_interval(curve, evidence, now, 6 * 3600.0)
    return curve


def parse_args() -> tuple[argparse.Namespace, NodeShape]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--node", choices=sorted(NODES), default="dsv3", help="node shape preset")
    parser.add_argument("--engines", type=int, help="engines on the node")
    parser.add_argument("--gpus-per-engine", type=int, help="GPUs of this node per engine")
    parser.add_argument("--layers", type=int, help="MoE layers")
    parser.add_argument("--experts", type=int, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, help="experts per token")
    parser.add_argument("--ep", type=int, help="expert-parallel size (1: none)")
    parser.add_argument("--cycles", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=2_000)
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="profile the timed cycles (cProfile) and print the top N entries")  # fmt: skip
    parser.add_argument("--profile-out", type=Path, help="with --profile: the raw pstats file")
    parser.add_argument("--metrics-out", type=Path, help="also write the last /metrics body here")
    args = parser.parse_args()
    overrides = {
        name: value
        for name in ("engines", "gpus_per_engine", "layers", "experts", "top_k", "ep")
        if (value := getattr(args, name)) is not None
    }
    return args, replace(NODES[args.node], **overrides)


async def main(args: argparse.Namespace, shape: NodeShape, engine_urls: list[str]) -> int:
    capture = CAPTURE.read_text()
    urls = engine_urls  # served by another process: their CPU is not the agent's
    work = Path(tempfile.mkdtemp(prefix="moe-watch-bench-node-"))
    rng = random.Random(0)
    targets = []
    per = shape.gpus_per_engine
    for i, url in enumerate(urls):
        directory = work / f"engine-{i}"
        directory.mkdir()
        write_experts(directory, shape, 1, rng, time.time())
        targets.append({"name": f"{shape.model}-{i}", "url": url,
                        "gpus": [per * i + g for g in range(per)],
                        "experts": {"source": "plugin", "directory": str(directory)}})  # fmt: skip
    state = work / "state"
    save_curves(state / FILE_NAME, {(t["name"], "tiny-mixtral"): full_curve(time.time())
                                     for t in targets}, time.time())  # fmt: skip
    settings = load_settings(None, targets=targets, window_seconds=300, listen="127.0.0.1:0",
                             state_dir=state)  # fmt: skip
    nvml = FakeNvml.with_gpus(shape.engines * per)
    clock = [time.time()]
    profiler = cProfile.Profile() if args.profile else None
    async with Agent(settings, nvml=nvml, clock=lambda: clock[0]) as agent:
        cpu, wall, reference = [], [], []
        freeze_startup_heap()  # as serve() does once the agent is up
        rss_start = rss_mb()  # the interpreter, its libraries and the agent, before any data
        rss_after_warmup = 0.0
        for cycle in range(args.cycles):
            if cycle % 10 == 0:  # new expert counts every 10 cycles (the plugin writes every 2 s)
                for i in range(shape.engines):
                    write_experts(work / f"engine-{i}", shape, cycle // 10 + 2, rng, clock[0] + 5.0)
            clock[0] += 5.0
            if profiler is not None:
                profiler.enable()
            c0, w0 = time.process_time(), time.perf_counter()
            await agent.run_cycle()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            if profiler is not None:
                profiler.disable()
            await agent.settle()  # the what-if thread, in what would be the gap between cycles
            # The reference, interleaved with the cycles so both see the same load on a shared
            # machine: prometheus_client parsing the same engine bytes, once per engine.
            r0 = time.process_time()
            for _ in urls:
                list(text_string_to_metric_families(capture))
            reference.append(time.process_time() - r0)
            if cycle == 500:
                gc.collect()
                rss_after_warmup = rss_mb()
        gc.collect()
        rss_end = rss_mb()
        whatif_views = (
            [
                r.experts.whatif
                for r in agent.snapshot.engines
                if r.experts is not None and r.experts.whatif is not None
            ]
            if agent.snapshot
            else []
        )
        typical, worst, skewed = whatif_costs(agent, shape) if shape.ep > 1 else (0.0, 0.0, 0.0)
        prediction = coverage_prediction_cost(agent, shape)
        parse_reference = statistics.median(reference)

        # Render: the agent's collector builds families from the snapshot and prometheus_client
        # encodes them. Reference: prometheus_client encoding the same, already built families.
        registry = build_registry(lambda: agent.snapshot)
        prebuilt = list(text_string_to_metric_families(generate_latest(registry).decode()))
        replay = CollectorRegistry(auto_describe=False)
        replay.register(Replay(prebuilt))
        render, render_reference = alternating_medians(
            lambda: generate_latest(registry), lambda: generate_latest(replay), 200
        )

        app = make_app(lambda: agent.snapshot)
        runner, agent_url = await start_server(app, "127.0.0.1", 0)
        # The scrapers share the agent's process: they read the bytes and leave decompressing
        # to nobody (Prometheus does that on its side), asking for gzip as Prometheus does,
        # and, for comparison, for plain text.
        latencies: dict[str, list[float]] = {"gzip": [], "identity": []}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=20), auto_decompress=False
        ) as session:
            async with session.get(
                agent_url + "/metrics", headers={"Accept-Encoding": "identity"}
            ) as first:
                body = await first.read()

            async def scraper(n: int, encoding: str) -> None:
                for _ in range(n):
                    t0 = time.perf_counter()
                    async with session.get(
                        agent_url + "/metrics", headers={"Accept-Encoding": encoding}
                    ) as response:
                        await response.read()
                    latencies[encoding].append(time.perf_counter() - t0)

            for encoding in latencies:
                await asyncio.gather(*(scraper(args.scrapes // 20, encoding) for _ in range(20)))
        await runner.cleanup()
    if args.metrics_out is not None:
        args.metrics_out.write_bytes(body)  # tests run `promtool check metrics` on it
    families = list(text_string_to_metric_families(body.decode()))
    series = sum(len(f.samples) for f in families)
    budget = engine_budget(layers=shape.layers, ep=shape.ep, gpus=shape.gpus_per_engine)
    per_engine = Counter(
        s.labels["engine"] for f in families for s in f.samples if "engine" in s.labels
    )
    q = statistics.quantiles(latencies["gzip"], n=100)
    plain = statistics.quantiles(latencies["identity"], n=100)
    cycle_median = statistics.median(cpu)
    ep = f"EP {shape.ep}" if shape.ep > 1 else "no EP"
    print(
        f"node: {shape.engines} x {shape.model} ({shape.gpus_per_engine} GPU each, "
        f"{shape.layers} x {shape.experts} experts, top-{shape.top_k}, {ep}); "
        f"load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}\n"
    )
    print("| measurement | value | reference / target |")
    print("|---|---|---|")
    print(
        f"| cycle CPU, median / p99 ({args.cycles} cycles) | {cycle_median * 1e3:.1f} / {q_of(cpu, 99) * 1e3:.1f} ms | prometheus_client parsing the same {shape.engines} expositions alone, between the cycles: {parse_reference * 1e3:.1f} ms (cycle = {cycle_median / parse_reference:.2f}x it); target <= 1.5x at DeepSeek-V3 scale, <= 100 ms with 8 engines |"
    )
    print(f"| cycle wall time, median | {statistics.median(wall) * 1e3:.1f} ms | interval 5 s |")
    print(
        f"| /metrics render (once per cycle; scrapes get the cached body) | {render * 1e3:.2f} ms | prometheus_client encoding the same families, prebuilt: {render_reference * 1e3:.2f} ms ({render / render_reference:.2f}x) |"
    )
    print(
        f"| cycle + render, CPU per cycle (medians) | {(cycle_median + render) * 1e3:.1f} ms | interval 5 s: {(cycle_median + render) / 5 * 100:.1f} % of one core |"
    )
    print(
        f"| /metrics with 20 concurrent scrapers asking for gzip (as Prometheus does), p50 / p99 | {q[49] * 1e3:.1f} / {q[98] * 1e3:.1f} ms | target p99 <= 20 ms; plain text: {plain[49] * 1e3:.1f} / {plain[98] * 1e3:.1f} ms |"
    )
    if shape.ep > 1:
        print(
            f"| EPLB what-if per computation, {shape.layers} x {shape.experts}, {ep}, CPU: uniform load / skewed load / worst case | {typical * 1e3:.0f} / {skewed * 1e3:.0f} / {worst * 1e3:.0f} ms | runs in the background, outside the cycle, every eplb_whatif_interval_seconds (60 s: once per 12 cycles); the last in-agent computation took {max((v.duration_seconds for v in whatif_views), default=0) * 1e3:.0f} ms; what-ifs present for {len(whatif_views)} of {shape.engines} engines |"
        )
    print(
        f"| coverage prediction per computation, {shape.layers} x {shape.experts}, 12 bins | {prediction * 1e3:.1f} ms | runs in the background, outside the cycle, at most every 30 s per engine |"
    )
    print(
        f"| /metrics body, series | {len(body) / 1024:.0f} KiB, {series} series; per engine at most {max(per_engine.values(), default=0)} | budget (docs/metrics.md#series-budget): {budget} per engine, {node_budget(shape.engines, budget)} per node |"
    )
    print(
        f"| RSS after 500 cycles / after {args.cycles} | {rss_after_warmup:.0f} / {rss_end:.0f} MB | before the first cycle: {rss_start:.0f} MB; target <= 100 MB, growth < 5 MB (dcgm-exporter: ~480 MiB on 8-GPU nodes) |"
    )
    if profiler is not None:
        if args.profile_out is not None:
            profiler.dump_stats(args.profile_out)
        for order in ("tottime", "cumulative"):
            print(f"\ncProfile of the {args.cycles} timed cycles, top {args.profile} by {order}:")
            pstats.Stats(profiler).sort_stats(order).print_stats(args.profile)
    return 0


def whatif_costs(agent: Agent, shape: NodeShape) -> tuple[float, float, float]:
    """CPU seconds of one EPLB what-if on the agent's window (median of 3): the default search
    (redundancies 0, EP, 2 x EP and the search until the target), the same on a skewed load, and
    the worst case (a target nothing reaches: the whole range, 0 to 256 in steps of 32)."""
    from moe_watch.signals.eplb_whatif import eplb_whatif

    snapshot = agent.snapshot
    assert snapshot is not None
    view = snapshot.engines[0].experts
    assert view is not None
    counts, layers = view.signals.window_counts, view.latest.layers
    rng = random.Random(1)
    skewed = [
        [
            float(int(50_000 / (1 + rng.randrange(shape.experts)) ** 1.2))
            for _ in range(shape.experts)
        ]
        for _ in layers
    ]
    for row in skewed:
        for hot in rng.sample(range(shape.experts), k=min(8, shape.experts)):
            row[hot] += rng.randrange(100_000, 400_000)

    def cost(rows: Sequence[Sequence[float]], target: float) -> float:
        return median_seconds(lambda: eplb_whatif(rows, layers, shape.ep, target=target), 3)

    return cost(counts, 0.9), cost(counts, 1.01), cost(skewed, 0.9)


def coverage_prediction_cost(agent: Agent, shape: NodeShape) -> float:
    """CPU seconds of one independent-routing coverage prediction (median of 5), all 12 bins."""
    from moe_watch.signals.coverage import independent_coverage

    snapshot = agent.snapshot
    assert snapshot is not None
    view = next(record.experts for record in snapshot.engines if record.experts is not None)
    means = [float(b) for b in BINS]
    return median_seconds(
        lambda: independent_coverage(view.signals.window_counts, shape.top_k, shape.experts, means),
        5,
    )


class Replay:
    """A collector serving families that were built beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def median_seconds(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        work()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def alternating_medians(
    work: Callable[[], object], reference: Callable[[], object], repeat: int
) -> tuple[float, float]:
    """Median CPU seconds of each, timed in turns so both see the same load."""
    ours, theirs = [], []
    for _ in range(repeat):
        ours.append(median_seconds(work, 1))
        theirs.append(median_seconds(reference, 1))
    return statistics.median(ours), statistics.median(theirs)


def q_of(values: list[float], percentile: int) -> float:
    return statistics.quantiles(values, n=100)[percentile - 1]


def serve_engines(count: int, conn: Connection, parents: Connection) -> None:
    """The engines, in a process of their own: sends their URLs, serves until told to stop
    (or until the benchmark's end of the pipe closes: it was killed)."""
    parents.close()  # the fork's copy: with it open, the pipe would never report the parent gone

    async def serve() -> None:
        models = json.loads((CAPTURES / "v1-models.json").read_text())
        capture = CAPTURE.read_text()
        servers = [await ReplayServer(capture, models=models).start() for _ in range(count)]
        conn.send([server.url for server in servers])
        with contextlib.suppress(EOFError):
            await asyncio.to_thread(conn.recv)
        for server in servers:
            await server.stop()

    asyncio.run(serve())


def run() -> int:
    args, shape = parse_args()
    ours, theirs = multiprocessing.Pipe()
    engines = multiprocessing.get_context("fork").Process(
        target=serve_engines, args=(shape.engines, theirs, ours), daemon=True
    )
    engines.start()  # before any event loop exists in this process
    theirs.close()
    fix_malloc_thresholds()  # as `moe-watch run` does
    try:
        return asyncio.run(main(args, shape, ours.recv()))
    finally:
        ours.send("stop")
        engines.join(10)


if __name__ == "__main__":
    raise SystemExit(run())
