"""A prometheus_client Collector that renders the latest Snapshot (no work beyond formatting).

Metric names are the published contract (docs/metrics.md): renaming one is a breaking change.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from moe_watch import __version__
from moe_watch.signals.expert_placement import expert_ranks
from moe_watch.snapshot import Snapshot
from moe_watch.thresholds import DEFAULT as T

PREFIX = "moe_watch_"
ENGINE_LABELS = ["engine", "model"]
# The Kubernetes owner of a GPU or engine, under OpenTelemetry's names for them. Not `namespace`,
# `pod`, `container`: the Prometheus Operator sets those to the agent's own pod on every series it
# scrapes, so ours would arrive renamed to `exported_*` (docs/metrics.md, "Labels and the scrape").
K8S_LABELS = ["k8s_namespace_name", "k8s_pod_name", "k8s_container_name"]

# (metric suffix, EngineSignals attribute, help). One gauge each, labelled by engine and model.
ENGINE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("requests_running", "requests_running", "Requests in the engine's running batch."),
    ("requests_waiting", "requests_waiting", "Requests queued, waiting for capacity."),
    ("kv_cache_usage_ratio", "kv_cache_usage_ratio", "KV-cache blocks in use, 0-1 (> 0.95 is critical)."),
    ("kv_cache_hit_ratio", "kv_cache_hit_ratio", "Prefix-cache hits / queries over the window."),
    ("kv_cache_free_tokens", "kv_cache_free_tokens", "KV-cache capacity still free, in tokens."),
    ("kv_cache_capacity_tokens", "kv_cache_capacity_tokens", "KV-cache capacity, in tokens."),
    ("preemptions_per_second", "preemptions_per_second", "Request preemptions per second over the window."),
    ("generation_tokens_per_second", "generation_tokens_per_second", "Generated tokens per second over the window."),
    ("prompt_tokens_per_second", "prompt_tokens_per_second", "Prefill tokens per second over the window."),
    ("requests_per_second", "requests_per_second", "Finished requests per second over the window."),
)  # fmt: skip


def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, labels=labels)


class Quantiles(Metric):
    """A summary of quantiles only: windowed quantiles are not counters, so no _sum/_count
    (`promtool check metrics` accepts this; it rejects a `quantile` label on a gauge)."""

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(PREFIX + name, documentation, "summary")

    def add(self, labels: dict[str, str], quantile: float, value: float) -> None:
        self.add_sample(self.name, labels | {"quantile": f"{quantile:g}"}, value)


class SnapshotCollector(Collector):
    """Yields metric families from whatever Snapshot ``get_snapshot`` returns right now."""

    def __init__(
        self, get_snapshot: Callable[[], Snapshot | None], *, expert_full_detail: bool = False
    ) -> None:
        self._get_snapshot = get_snapshot
        self._full_detail = expert_full_detail

    def collect(self) -> Iterator[Metric]:
        build = gauge("build_info", "moe-watch build; value is always 1.", ["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        snapshot = self._get_snapshot()
        if snapshot is None:
            return  # before the first cycle: only build_info (and /readyz says not ready)
        yield from _self_metrics(snapshot)
        yield from _gpu_metrics(snapshot)
        yield from _engine_metrics(snapshot)
        yield from _expert_metrics(snapshot, full_detail=self._full_detail)
        yield from _whatif_metrics(snapshot)
        yield from _all2all_metrics(snapshot)
        yield from _interconnect_metrics(snapshot)
        yield from _plan_metrics(snapshot)
        yield from _expert_group_metrics(snapshot)
        yield from _batching_metrics(snapshot)
        yield from _coverage_metrics(snapshot)


def _self_metrics(snap: Snapshot) -> Iterator[Metric]:
    up = gauge("source_up", "1 if the source's last collection succeeded.", ["source"])
    duration = gauge(
        "collect_duration_seconds", "Duration of the source's last collection.", ["source"]
    )
    last_ok = gauge(
        "last_success_timestamp_seconds", "Unix time of the source's last success.", ["source"]
    )
    errors = CounterMetricFamily(
        PREFIX + "collect_errors", "Collection errors by source and reason.", labels=["source", "reason"]
    )  # fmt: skip
    for status in snap.sources:
        up.add_metric([status.name], 1.0 if status.up else 0.0)
        duration.add_metric([status.name], status.duration_seconds)
        if status.last_success_timestamp is not None:
            last_ok.add_metric([status.name], status.last_success_timestamp)
        for reason, count in sorted(status.errors_total.items()):
            errors.add_metric([status.name, reason], count)
    targets = gauge("target_up", "1 if the engine's last scrape succeeded.", ["engine"])
    for engine, is_up in sorted(snap.targets_up.items()):
        targets.add_metric([engine], 1.0 if is_up else 0.0)
    cycle = gauge("cycle_duration_seconds", "Wall time of the agent's last collection cycle.", [])
    cycle.add_metric([], snap.cycle_duration_seconds)
    yield from (up, duration, last_ok, errors, targets, cycle)


def _gpu_metrics(snap: Snapshot) -> Iterator[Metric]:
    labels = ["gpu", "engine"]
    info = gauge(
        "gpu_info",
        "GPU identity; value is always 1.",
        ["gpu", "uuid", "name", "driver_version", "engine", *K8S_LABELS],
    )
    up = gauge("gpu_up", "1 if NVML could read the GPU, 0 if it is lost.", labels)
    util = gauge("gpu_utilization_ratio", "GPU utilization, 0-1.", labels)
    used = gauge(
        "gpu_memory_used_bytes", "GPU memory in use, bytes (NVML v2: excludes reserved).", labels
    )
    total = gauge("gpu_memory_total_bytes", "GPU memory, bytes.", labels)
    ratio = gauge(
        "gpu_memory_used_ratio", "GPU memory in use / total, 0-1 (> 0.95 leaves no room).", labels
    )
    temp = gauge("gpu_temperature_celsius", "GPU temperature.", labels)
    power = gauge("gpu_power_watts", "GPU power draw.", labels)
    for view in snap.gpus:
        g = view.sample
        key = [str(g.index), view.engine or ""]
        namespace, pod, container = view.owner or ("", "", "")
        info.add_metric(
            [
                str(g.index),
                g.uuid,
                g.name,
                snap.driver_version or "",
                view.engine or "",
                namespace,
                pod,
                container,
            ],
            1,
        )
        up.add_metric(key, 1.0 if g.up else 0.0)
        for family, value in (
            (util, g.utilization_ratio),
            (used, g.memory_used_bytes),
            (total, g.memory_total_bytes),
            (ratio, view.memory_used_ratio),
            (temp, g.temperature_celsius),
            (power, g.power_watts),
        ):
            if value is not None:
                family.add_metric(key, value)
    xid = CounterMetricFamily(
        PREFIX + "gpu_xid_errors", "Xid errors seen since the agent started.", labels=["gpu", "xid"]
    )
    for (index, code), count in sorted(snap.xid_totals.items()):
        xid.add_metric([str(index), str(code)], count)
    spread = gauge(
        "engine_gpu_utilization_spread_ratio",
        "max - min GPU utilization across one engine's GPUs (a hot expert makes one GPU hot).",
        ["engine"],
    )
    for engine, value in sorted(snap.engine_gpu_spread.items()):
        spread.add_metric([engine], value)
    node = gauge(
        "node_gpu_utilization_spread_ratio", "max - min GPU utilization across the node.", []
    )
    if snap.node_gpu_spread is not None:
        node.add_metric([], snap.node_gpu_spread)
    yield from (info, up, util, used, total, ratio, temp, power, xid, spread, node)  # fmt: skip
    yield _gpu_allocations(snap)


def _gpu_allocations(snap: Snapshot) -> Metric:
    """One series per kubelet allocation on a GPU: shared GPUs (time-slicing, MIG, DRA) too."""
    allocation = gauge(
        "gpu_allocation_info",
        "A GPU device the kubelet allocated (whole GPU, time-slice replica, MIG or DRA device) and the container holding it; value is always 1.",
        ["gpu", "uuid", "k8s_device_id", "k8s_resource_name", *K8S_LABELS],
    )
    for view in snap.gpus:
        for device_id, resource, namespace, pod, container in view.allocations:
            allocation.add_metric(
                [
                    str(view.sample.index),
                    view.sample.uuid,
                    device_id,
                    resource,
                    namespace,
                    pod,
                    container,
                ],
                1,
            )
    return allocation


def _engine_metrics(snap: Snapshot) -> Iterator[Metric]:
    info = gauge(
        "engine_info",
        "Serving engine identity; value is always 1.",
        ["engine", "model", "kind", "version", *K8S_LABELS[:2]],
    )
    max_len = gauge("engine_max_model_len_tokens", "The engine's max_model_len.", ENGINE_LABELS)
    families = {attr: gauge(name, doc, ENGINE_LABELS) for name, attr, doc in ENGINE_GAUGES}
    latency = Quantiles(
        "latency_seconds",
        "Request latency quantiles over the window, from histogram bucket deltas "
        "(kind: e2e, ttft, itl, queue).",
    )
    for view in snap.engines:
        key = [view.engine, view.model]
        namespace, pod = snap.engine_pods.get(view.engine, ("", ""))
        info.add_metric([*key, view.kind, view.version, namespace, pod], 1)
        if view.max_model_len is not None:
            max_len.add_metric(key, view.max_model_len)
        for attr, family in families.items():
            value = getattr(view.signals, attr)
            if value is not None:
                family.add_metric(key, value)
        for (kind, q), seconds in sorted(view.signals.latency_seconds.items()):
            latency.add({"engine": view.engine, "model": view.model, "kind": kind}, q, seconds)
    yield info
    yield max_len
    yield from families.values()
    yield latency


def _expert_metrics(snap: Snapshot, *, full_detail: bool) -> Iterator[Metric]:
    """Per-layer skew and the layer x load-rank grid by default: ~470 series for DeepSeek-V3.

    No series is keyed by a value that moves: which expert is hottest is the *value* of
    expert_load_rank_expert_id, so skew, share and rank series keep their identity (and alerts
    their `for:` timers) while two experts trade places.
    """
    layer_labels = ["engine", "layer"]
    rank_labels = ["engine", "layer", "load_rank"]
    skew = gauge(
        "expert_skew_ratio",
        "max/mean - 1 of tokens per expert in the layer over the window "
        f"(0.5 = 50 % skew; alert above {T.expert_skew:g}).",
        layer_labels,
    )
    balance = gauge(
        "expert_balancedness_ratio",
        "mean/max of tokens per expert in the layer over the window (1 = even).",
        layer_labels,
    )
    share = gauge(
        "expert_max_token_share",
        "Fraction of the layer's tokens that visited its most loaded expert over the window "
        f"(collapse above {T.expert_collapse_share:g}).",
        layer_labels,
    )
    ranked_share = gauge(
        "expert_load_rank_token_share",
        "Token share of the layer's load_rank-th most loaded expert over the window "
        "(load_rank 1 = the hottest; top N per layer).",
        rank_labels,
    )
    ranked_id = gauge(
        "expert_load_rank_expert_id",
        "Logical id of the layer's load_rank-th most loaded expert over the window "
        "(the value is the expert id: join it to the share, never key alerts on it).",
        rank_labels,
    )
    max_skew = gauge(
        "expert_max_skew_ratio",
        "The highest per-layer skew of the engine over the window.",
        ["engine"],
    )
    collapsed = gauge(
        "expert_collapsed_layers",
        f"Layers whose hottest expert took > {T.expert_collapse_share:g} of the tokens over the window.",
        ["engine"],
    )
    rank = gauge(
        "expert_rank_load_ratio",
        "Tokens routed to the experts on an EP rank / the mean rank (1 = even).",
        ["engine", "rank"],
    )
    eplb = gauge(
        "expert_eplb_balancedness_ratio",
        "vLLM EPLB balancedness (mean/max EP-rank load) from its log.",
        ["engine", "model"],
    )
    observed = gauge(
        "expert_layers_observed",
        "MoE layers with routed tokens in the window; 0 while an engine with an expert source "
        "shows none (plugin missing or not writing).",
        ["engine"],
    )
    tokens = CounterMetricFamily(
        PREFIX + "expert_tokens",
        "Token-to-expert assignments per (layer, expert) since the counters started (opt-in).",
        labels=["engine", "layer", "expert"],
    )
    layers_seen = dict.fromkeys(snap.expert_engines, 0)
    for view in snap.experts:
        signals = view.signals
        layers_seen[view.engine] = len(signals.layers)
        for layer in signals.layers:
            key = [view.engine, str(layer.layer)]
            skew.add_metric(key, layer.skew)
            balance.add_metric(key, layer.balancedness)
            share.add_metric(key, layer.max_share)
            for load_rank, (expert, token_share) in enumerate(layer.ranked, start=1):
                cell = [*key, str(load_rank)]
                ranked_share.add_metric(cell, token_share)
                ranked_id.add_metric(cell, expert)
        if signals.max_skew is not None:
            max_skew.add_metric([view.engine], signals.max_skew)
            collapsed.add_metric([view.engine], len(signals.collapsed_layers))
        for ep_rank, load in sorted(signals.rank_load.items()):
            rank.add_metric([view.engine, str(ep_rank)], load)
        if full_detail:
            for layer_index, row in zip(view.latest.layers, view.latest.counts, strict=True):
                for expert, count in enumerate(row):
                    tokens.add_metric([view.engine, str(layer_index), str(expert)], count)
    for engine, count in sorted(layers_seen.items()):
        observed.add_metric([engine], count)
    for (engine, model), value in sorted(snap.eplb_balancedness.items()):
        eplb.add_metric([engine, model], value)
    yield from (skew, balance, share, ranked_share, ranked_id, max_skew, collapsed, rank, eplb)
    yield observed
    if full_detail:
        yield tokens


def _whatif_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The EPLB what-if (docs/experts.md): a handful of series per engine, none per expert.

    ``redundant_experts`` takes the few configured counts (eplb_whatif_redundant), fixed for the
    agent's life: not a value that moves. The smallest count that reaches the target is a value;
    absent when no count in the searched range does (``..._searched_max`` says how far it went).
    """
    today = gauge(
        "expert_rank_balancedness_ratio",
        "EP-rank balancedness today (static placement): sum over layers of the mean rank's "
        "tokens / sum of the busiest rank's, over the window (vLLM EPLB's definition; 1 = even).",
        ["engine"],
    )
    whatif = gauge(
        "expert_eplb_whatif_balancedness_ratio",
        "EP-rank balancedness vLLM's EPLB would reach on the window's load with this many "
        "redundant experts (moe-watch what-if, recomputed every eplb_whatif_interval_seconds).",
        ["engine", "redundant_experts"],
    )
    needed = gauge(
        "expert_eplb_redundant_needed",
        "Smallest redundant-expert count with which vLLM's EPLB reaches the what-if target "
        f"balancedness (default {T.eplb_whatif_target:g}); absent when none in the searched range.",
        ["engine"],
    )
    reached = gauge(
        "expert_eplb_redundant_needed_balancedness_ratio",
        "EP-rank balancedness vLLM's EPLB reaches with expert_eplb_redundant_needed redundant experts.",
        ["engine"],
    )
    searched = gauge(
        "expert_eplb_redundant_searched_max",
        "Largest redundant-expert count the what-if tried (the end of its search range).",
        ["engine"],
    )
    for view in snap.experts:
        if view.whatif is None:
            continue
        result = view.whatif.result
        key = [view.engine]
        today.add_metric(key, result.balancedness_today)
        for case in result.cases:
            whatif.add_metric([view.engine, str(case.redundant_experts)], case.balancedness)
        if result.searched:
            searched.add_metric(key, result.searched[-1])
        if result.redundant_needed is not None and result.needed_balancedness is not None:
            needed.add_metric(key, result.redundant_needed)
            reached.add_metric(key, result.needed_balancedness)
    yield from (today, whatif, needed, reached, searched)


def _all2all_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Expert-parallel exchange time per forward pass (issue #19), from the vLLM plugin's files."""
    seconds = Quantiles(
        "expert_all2all_seconds",
        "All-to-all (EP dispatch + combine) time per forward pass over the window, quantiles "
        f"(healthy < {T.all2all_healthy_seconds:g} s, alert > {T.all2all_seconds:g} s).",
    )
    passes = gauge(
        "expert_all2all_passes_timed",
        "Forward passes whose all-to-all time was measured in the window.",
        ["engine"],
    )
    info = gauge(
        "expert_all2all_info",
        "The all2all backend the engine's workers use; value is always 1.",
        ["engine", "backend"],
    )
    for view in snap.experts:
        if view.latest.all2all is None:
            continue
        info.add_metric([view.engine, view.latest.all2all_backend], 1)
        passes.add_metric([view.engine], view.signals.all2all_passes)
        for q, value in sorted(view.signals.all2all_seconds.items()):
            seconds.add({"engine": view.engine}, q, value)
    yield from (seconds, passes, info)


def _interconnect_metrics(snap: Snapshot) -> Iterator[Metric]:
    """NVLink / PCIe topology per GPU, and each engine's interconnect (issue #19)."""
    labels = ["gpu", "engine"]
    links = gauge(
        "gpu_nvlink_links_up",
        "NVLink links in the active state (0 on a GPU without NVLink).",
        labels,
    )
    transmit = CounterMetricFamily(
        PREFIX + "gpu_nvlink_transmit_bytes",
        "Bytes sent over all the GPU's NVLink links (NVML throughput counter).",
        labels=labels,
    )
    receive = CounterMetricFamily(
        PREFIX + "gpu_nvlink_receive_bytes",
        "Bytes received over all the GPU's NVLink links (NVML throughput counter).",
        labels=labels,
    )
    generation = gauge("gpu_pcie_link_generation", "Current PCIe link generation.", labels)
    generation_max = gauge(
        "gpu_pcie_link_max_generation", "Maximum PCIe link generation of GPU and slot.", labels
    )
    width = gauge("gpu_pcie_link_width", "Current PCIe link width (lanes).", labels)
    width_max = gauge("gpu_pcie_link_max_width", "Maximum PCIe link width (lanes).", labels)
    for view in snap.gpus:
        link = view.sample.link
        if link is None or not view.sample.up:
            continue
        key = [str(view.sample.index), view.engine or ""]
        for family, value in (
            (links, link.nvlink_links_up),
            (transmit, link.nvlink_transmit_bytes),
            (receive, link.nvlink_receive_bytes),
            (generation, link.pcie_generation),
            (generation_max, link.pcie_max_generation),
            (width, link.pcie_width),
            (width_max, link.pcie_max_width),
        ):
            if value is not None:
                family.add_metric(key, value)
    interconnect = gauge(
        "engine_interconnect_info",
        "How an engine's GPUs reach each other: nvlink (every pair over NVLink) or pcie (some "
        "pair only over PCIe/the host); multi-GPU engines; value is always 1.",
        ["engine", "interconnect"],
    )
    for engine, kind in sorted(snap.engine_interconnect.items()):
        interconnect.add_metric([engine, kind], 1)
    yield from (links, transmit, receive, generation, generation_max, width, width_max)
    yield interconnect


def _plan_metrics(snap: Snapshot) -> Iterator[Metric]:
    budget = gauge(
        "sized_budget_bytes",
        "Per-GPU memory budget of the engine's plan (moe-watch size).",
        ["engine"],
    )
    used = gauge(
        "budget_used_ratio",
        "GPU memory used / the plan's per-GPU budget (> 1: above plan).",
        ["engine", "gpu"],
    )
    headroom = gauge("memory_headroom_ratio", "GPU memory still free / total, 0-1.", ["gpu"])
    drift = gauge(
        "config_drift",
        "1 if the running setting breaks the plan or an MoE rule.",
        ["engine", "setting"],
    )
    info = gauge(
        "config_drift_info",
        "A drifted setting: running and expected values; always 1.",
        ["engine", "setting", "running", "expected", "rule"],
    )
    for engine, value in sorted(snap.budgets.items()):
        budget.add_metric([engine], value)
    for view in snap.gpus:
        g = view.sample
        if not g.up or g.memory_used_bytes is None:
            continue
        if g.memory_total_bytes:
            headroom.add_metric(
                [str(g.index)], max(0.0, 1 - g.memory_used_bytes / g.memory_total_bytes)
            )
        budget_bytes = snap.budgets.get(view.engine or "")
        if view.engine and budget_bytes:
            used.add_metric([view.engine, str(g.index)], g.memory_used_bytes / budget_bytes)
    for engine, findings in sorted(snap.drift.items()):
        drifted = {d.setting for d in findings}
        for setting in sorted(drifted | DRIFT_SETTINGS):
            drift.add_metric([engine, setting], 1.0 if setting in drifted else 0.0)
        for d in findings:
            info.add_metric([engine, d.setting, d.running, d.expected, d.rule], 1)
    yield from (budget, used, headroom, drift, info)


def _expert_group_metrics(snap: Snapshot) -> Iterator[Metric]:
    """For engines whose workers span nodes (experts.engine_group) only: this node's share of the
    engine's window counts, which recording rules sum over nodes into exact engine-level signals
    (rules.py expert_group_rules; docs/experts.md "Engines that span nodes").

    Window counts rather than cumulative counters: every agent's window is the same length and
    ends at its last cycle, and a sum of window counts is exact where increase() would
    extrapolate each node's counter over a different scrape alignment. Per (layer, expert) on
    purpose: the hottest expert of a layer is a max over the *sum* across nodes, which no
    per-node summary gives.
    """
    labels = ["engine_group", "layer", "expert"]
    tokens = gauge(
        "expert_group_window_tokens",
        "Token-to-expert assignments per (layer, expert) routed by this node's workers of the "
        "engine group over the window (summed over nodes by the recording rules).",
        labels,
    )
    ranks = gauge(
        "expert_group_rank_window_tokens",
        "Assignments over the window, all layers, to the experts an EP rank holds, routed by "
        "this node's workers of the engine group.",
        ["engine_group", "rank"],
    )
    expert_id = gauge(
        "expert_group_expert_id",
        "The value is the logical expert id (constant): lets rules turn the expert label into "
        "a number (load-rank ids, ties to the lower id).",
        ["engine_group", "expert"],
    )
    top_k = gauge(
        "expert_group_top_k", "Experts per token (top-k) of the engine group.", ["engine_group"]
    )
    info = gauge(
        "expert_group_info",
        "This node's engine is part of the engine group; value is always 1.",
        ["engine", "engine_group"],
    )
    for view in snap.experts:
        group = view.engine_group
        if group is None:
            continue
        info.add_metric([view.engine, group], 1)
        latest, window = view.latest, view.signals.window_counts
        if not window:
            continue  # fewer than two samples: no window yet (absent, never a made-up 0)
        top_k.add_metric([group], latest.top_k)
        for expert in range(latest.num_experts):
            expert_id.add_metric([group, str(expert)], expert)
        for layer, row in zip(latest.layers, window, strict=True):
            for expert, count in enumerate(row):
                tokens.add_metric([group, str(layer), str(expert)], count)
        if latest.ep_size > 1:
            per_rank = [0.0] * latest.ep_size
            placement = latest.placement or expert_ranks(latest.num_experts, latest.ep_size)
            for row in window:
                for expert, count in enumerate(row):
                    per_rank[placement[expert]] += count
            for rank, count in enumerate(per_rank):
                ranks.add_metric([group, str(rank)], count)
    yield from (tokens, ranks, expert_id, top_k, info)


def _batching_metrics(snap: Snapshot) -> Iterator[Metric]:
    """The batching curve: one series per (engine, model, batch bin) with evidence (at most 12)."""
    labels = [*ENGINE_LABELS, "batch"]
    tokens = gauge(
        "batch_generation_tokens_per_second_per_gpu",
        "Generated tokens/s per GPU while the running batch was in this bin (aged evidence).",
        labels,
    )
    itl = gauge("batch_itl_p95_seconds", "ITL P95 while the running batch was in this bin.", labels)
    ttft = gauge(
        "batch_ttft_p95_seconds", "TTFT P95 while the running batch was in this bin.", labels
    )
    evidence = gauge(
        "batch_evidence_seconds",
        "Seconds the running batch spent in this bin (aged: halved every half-life).",
        labels,
    )
    knee = gauge(
        "batch_knee_requests",
        "The batch bin with the most tokens/s per GPU within the ITL P95 SLO; absent on thin "
        "evidence.",
        ENGINE_LABELS,
    )
    peak = gauge(
        "batch_knee_peak_reached",
        "1 when a larger batch with evidence did worse than the knee (a measured peak).",
        ENGINE_LABELS,
    )
    for (engine, model), answer in sorted(snap.batching.items()):
        for point in answer.points:
            key = [engine, model, str(point.batch_bin)]
            tokens.add_metric(key, point.tokens_per_second_per_gpu)
            evidence.add_metric(key, point.seconds)
            if point.itl_p95_seconds is not None:
                itl.add_metric(key, point.itl_p95_seconds)
            if point.ttft_p95_seconds is not None:
                ttft.add_metric(key, point.ttft_p95_seconds)
        if answer.knee is not None:
            knee.add_metric([engine, model], answer.knee)
            peak.add_metric([engine, model], 1.0 if answer.peak_reached else 0.0)
    yield from (tokens, itl, ttft, evidence, knee, peak)


def _coverage_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Expert coverage per tokens-per-step bin (at most 12 per engine) and the dense point."""
    labels = ["engine", "tokens"]
    observed = gauge(
        "expert_coverage_ratio",
        "Mean fraction of a layer's experts a step of this many tokens reached (window).",
        labels,
    )
    independent = gauge(
        "expert_coverage_independent_ratio",
        "What independent tokens with the window's expert shares would reach; the gap to "
        "expert_coverage_ratio is request locality.",
        labels,
    )
    steps = gauge(
        "expert_coverage_steps", "Sampled steps in the window, by tokens per step.", labels
    )
    dense = gauge(
        "expert_dense_point_tokens",
        f"Smallest tokens-per-step bin whose steps reach >= {T.expert_dense_coverage:g} of the "
        "experts (a dense model's memory reads).",
        ["engine"],
    )
    for experts in snap.experts:
        curve = experts.coverage
        if curve is None:
            continue
        for b in curve.bins:
            key = [experts.engine, str(b.tokens_bin)]
            observed.add_metric(key, b.observed)
            steps.add_metric(key, b.steps)
            if b.independent is not None:
                independent.add_metric(key, b.independent)
        if curve.dense_point is not None:
            dense.add_metric([experts.engine], curve.dense_point)
    yield from (observed, independent, steps, dense)


# Settings always exported for every engine checked (0 = fine), so alerts and dashboards see them.
DRIFT_SETTINGS = frozenset(
    {
        "gpu_memory_utilization",
        "max_num_seqs",
        "max_model_len",
        "enable_prefix_caching",
        "enable_expert_parallel",
        "dtype",
        "gpus",
        "interconnect",
    }
)


def build_registry(
    get_snapshot: Callable[[], Snapshot | None], *, expert_full_detail: bool = False
) -> CollectorRegistry:
    """A fresh registry holding only the snapshot collector (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot, expert_full_detail=expert_full_detail))
    return registry
