"""A prometheus_client Collector that renders the latest Snapshot (no work beyond formatting:
every number is computed in signals/ or drift.py and stored in the snapshot).

Metric names are the published contract (docs/metrics.md): renaming one is a breaking change.

The body is rendered part by part: the agent's self-metrics, each GPU, the node, each engine.
A part whose rendering raises, or holds a value that is not a number (an integer with 310
digits), is left out whole; every other part is rendered, ``render_failed{part}`` says which
part is missing, and the failure is logged when it starts and when it ends.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Protocol

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from moe_watch import __version__
from moe_watch import samples as s
from moe_watch.sizing.allocated import KvPlan
from moe_watch.snapshot import EXPERTS, EngineRecord, GpuView, Snapshot
from moe_watch.thresholds import DEFAULT as T

log = structlog.get_logger("moe_watch.serving.exporter")

PREFIX = "moe_watch_"
ENGINE_LABELS = ["engine", "model"]
# The Kubernetes owner of a GPU or engine, under OpenTelemetry's names for them. Not `namespace`,
# `pod`, `container`: the Prometheus Operator sets those to the agent's own pod on every series it
# scrapes, so ours would arrive renamed to `exported_*` (docs/metrics.md, "Labels and the scrape").
K8S_LABELS = ["k8s_namespace_name", "k8s_pod_name", "k8s_container_name"]

RENDER_FAILED_HELP = (
    "1 while the part's series (part: agent, node, gpu:<index>, engine:<id>; all: the whole "
    "body) are left out of /metrics because they could not be rendered (the log has why); 0 "
    "after it rendered again; absent for a part that never failed."
)

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


def counter(name: str, documentation: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, documentation, labels=labels)


class Quantiles(Metric):
    """A summary of quantiles only: windowed quantiles are not counters, so no _sum/_count
    (`promtool check metrics` accepts this; it rejects a `quantile` label on a gauge).
    ``labels`` are given without ``quantile``, their values with it, last."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(PREFIX + name, documentation, "summary")
        self._labelnames = (*labels, "quantile")

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._labelnames, labels, strict=True)), value)


# (metric suffix, EngineSignals.histograms key, help). The engine's own cumulative buckets,
# labelled by engine and model only, so `sum by (le)` adds them up across engines and nodes.
ENGINE_HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("e2e_request_latency_seconds", s.LATENCY_E2E, "End-to-end request latency (the engine's histogram, re-published)."),
    ("time_to_first_token_seconds", s.LATENCY_TTFT, "Time to first token (the engine's histogram, re-published)."),
    ("inter_token_latency_seconds", s.LATENCY_ITL, "Inter-token latency, TPOT (the engine's histogram, re-published)."),
    ("request_queue_time_seconds", s.LATENCY_QUEUE, "Time requests waited in the queue (the engine's histogram, re-published)."),
    ("request_prompt_tokens", s.HISTOGRAM_PROMPT_TOKENS, "Prompt tokens per finished request (the engine's histogram, re-published)."),
    ("request_generation_tokens", s.HISTOGRAM_GENERATION_TOKENS, "Generated tokens per finished request (the engine's histogram, re-published)."),
)  # fmt: skip


class Histograms(Metric):
    """A histogram family filled sample by sample: ``bucket``, ``sum`` and ``count`` are the
    families a Part adds to (``bucket`` takes the ``le`` value last)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(PREFIX + name, documentation, "histogram")
        self.bucket = _Samples(self, "_bucket", (*labels, "le"))
        self.sum = _Samples(self, "_sum", tuple(labels))
        self.count = _Samples(self, "_count", tuple(labels))


def le_value(bound: float) -> str:
    """One spelling per bound on every agent (`sum by (le)` groups by the string)."""
    return "+Inf" if bound == math.inf else repr(float(bound))


class _Samples:
    __slots__ = ("_labelnames", "_metric", "_name")

    def __init__(self, metric: Metric, suffix: str, labelnames: tuple[str, ...]) -> None:
        self._metric, self._name, self._labelnames = metric, metric.name + suffix, labelnames

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self._metric.add_sample(self._name, dict(zip(self._labelnames, labels, strict=True)), value)


class Family(Protocol):
    def add_metric(self, labels: Sequence[str], value: float) -> None: ...


class Part:
    """The samples of one part of the body, added to their families only once the whole part
    is rendered: a part that raises, or holds a value that is no number, leaves no half."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: list[tuple[Family, Sequence[str], float]] = []

    def add(self, family: Family, labels: Sequence[str], value: float) -> None:
        # float() here, not in the encoder: an int past float's range raises now, in its part
        self._samples.append((family, labels, float(value)))

    def commit(self) -> None:
        for family, labels, value in self._samples:
            family.add_metric(labels, value)


class SnapshotCollector(Collector):
    """Yields metric families from whatever Snapshot ``get_snapshot`` returns right now."""

    def __init__(
        self, get_snapshot: Callable[[], Snapshot | None], *, expert_full_detail: bool = False
    ) -> None:
        self._get_snapshot = get_snapshot
        self._full_detail = expert_full_detail
        self._failing: set[str] = set()  # parts left out of the last body
        self._failed: set[str] = set()  # parts left out of some body, still in the snapshot

    def collect(self) -> Iterator[Metric]:
        build = gauge("build_info", "moe-watch build; value is always 1.", ["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build
        snapshot = self._get_snapshot()
        if snapshot is None:
            return  # before the first cycle: only build_info (and /readyz says not ready)
        families = Families(full_detail=self._full_detail)
        full = self._full_detail
        parts: list[tuple[str, Callable[[Part], None]]] = [
            ("agent", partial(_self_part, f=families, snap=snapshot))
        ]
        parts += [
            (
                f"gpu:{view.sample.index}",
                partial(_gpu_part, f=families, view=view, driver=snapshot.driver_version),
            )
            for view in snapshot.gpus
        ]
        parts.append(("node", partial(_node_part, f=families, snap=snapshot)))
        parts += [
            (
                f"engine:{record.name}",
                partial(_engine_part, f=families, record=record, full_detail=full),
            )
            for record in snapshot.engines
        ]
        failed: dict[str, Exception] = {}
        for name, render in parts:
            part = Part()
            try:
                render(part)
            except Exception as exc:  # this part only: the others are rendered
                failed[name] = exc
                continue
            part.commit()
        yield from families.in_order()
        yield self._render_failed(failed, {name for name, _ in parts})

    def _render_failed(self, failed: dict[str, Exception], present: set[str]) -> Metric:
        """The render_failed series, and the log lines when a part starts or stops failing."""
        for name in sorted(failed.keys() - self._failing):
            log.error("rendering /metrics left a part out", part=name, exc_info=failed[name])
        for name in sorted(self._failing - failed.keys()):
            log.info("rendering /metrics works again for a part it left out", part=name)
        self._failing = set(failed)
        self._failed = (self._failed & present) | self._failing
        family = gauge("render_failed", RENDER_FAILED_HELP, ["part"])
        for name in sorted(self._failed):
            family.add_metric([name], 1.0 if name in self._failing else 0.0)
        return family


class Families:
    """Every family of one body, empty, in the order they are published."""

    def __init__(self, *, full_detail: bool) -> None:
        self.full_detail = full_detail
        # the agent itself
        self.source_up = gauge(
            "source_up", "1 if the source's last collection succeeded.", ["source"]
        )
        self.collect_duration = gauge(
            "collect_duration_seconds", "Duration of the source's last collection.", ["source"]
        )
        self.last_success = gauge(
            "last_success_timestamp_seconds", "Unix time of the source's last success.", ["source"]
        )
        self.collect_errors = counter(
            "collect_errors", "Collection errors by source and reason.", ["source", "reason"]
        )
        self.target_up = gauge("target_up", "1 if the engine's last scrape succeeded.", ["engine"])
        self.cycle_duration = gauge(
            "cycle_duration_seconds", "Wall time of the agent's last collection cycle.", []
        )
        # GPUs and the node
        gpu = ["gpu", "engine"]
        self.gpu_info = gauge(
            "gpu_info",
            "GPU identity; value is always 1.",
            ["gpu", "uuid", "name", "driver_version", "engine", *K8S_LABELS],
        )
        self.gpu_up = gauge("gpu_up", "1 if NVML could read the GPU, 0 if it is lost.", gpu)
        self.gpu_utilization = gauge("gpu_utilization_ratio", "GPU utilization, 0-1.", gpu)
        self.gpu_memory_used = gauge(
            "gpu_memory_used_bytes", "GPU memory in use, bytes (NVML v2: excludes reserved).", gpu
        )
        self.gpu_memory_total = gauge("gpu_memory_total_bytes", "GPU memory, bytes.", gpu)
        self.gpu_memory_ratio = gauge(
            "gpu_memory_used_ratio", "GPU memory in use / total, 0-1 (> 0.95 leaves no room).", gpu
        )
        self.gpu_temperature = gauge("gpu_temperature_celsius", "GPU temperature.", gpu)
        self.gpu_power = gauge("gpu_power_watts", "GPU power draw.", gpu)
        self.xid = counter(
            "gpu_xid_errors", "Xid errors seen since the agent started.", ["gpu", "xid"]
        )
        self.engine_spread = gauge(
            "engine_gpu_utilization_spread_ratio",
            "max - min GPU utilization across one engine's GPUs (a hot expert makes one GPU hot).",
            ["engine"],
        )
        self.node_spread = gauge(
            "node_gpu_utilization_spread_ratio", "max - min GPU utilization across the node.", []
        )
        self.gpu_allocation = gauge(
            "gpu_allocation_info",
            "A GPU device the kubelet allocated (whole GPU, time-slice replica, MIG or DRA device) and the container holding it; value is always 1.",
            ["gpu", "uuid", "k8s_device_id", "k8s_resource_name", *K8S_LABELS],
        )
        # engines
        self.engine_info = gauge(
            "engine_info",
            "Serving engine identity; value is always 1.",
            ["engine", "model", "kind", "version", *K8S_LABELS[:2]],
        )
        self.max_model_len = gauge(
            "engine_max_model_len_tokens", "The engine's max_model_len.", ENGINE_LABELS
        )
        self.engine_gauges = [
            (attr, gauge(name, doc, ENGINE_LABELS)) for name, attr, doc in ENGINE_GAUGES
        ]
        self.engine_histograms = [
            (key, Histograms(name, doc, ENGINE_LABELS)) for name, key, doc in ENGINE_HISTOGRAMS
        ]
        self.requests_finished = counter(
            "requests_finished",
            "Requests the engine finished since it started, by finish reason (stop, length, "
            "abort, error, ...: vLLM's request_success_total).",
            [*ENGINE_LABELS, "finished_reason"],
        )
        self._experts()
        self._whatif()
        self._all2all()
        self._interconnect()
        self._plan()
        self._groups()
        self._batching()

    def _experts(self) -> None:
        """Per-layer skew and the layer x load-rank grid by default: ~470 series for DeepSeek-V3.

        No series is keyed by a value that moves: which expert is hottest is the *value* of
        expert_load_rank_expert_id, so skew, share and rank series keep their identity (and
        alerts their `for:` timers) while two experts trade places.
        """
        layer_labels = ["engine", "layer"]
        rank_labels = ["engine", "layer", "load_rank"]
        self.skew = gauge(
            "expert_skew_ratio",
            "max/mean - 1 of tokens per expert in the layer over the window "
            f"(0.5 = 50 % skew; alert above {T.expert_skew:g}).",
            layer_labels,
        )
        self.balance = gauge(
            "expert_balancedness_ratio",
            "mean/max of tokens per expert in the layer over the window (1 = even).",
            layer_labels,
        )
        self.share = gauge(
            "expert_max_token_share",
            "Fraction of the layer's tokens that visited its most loaded expert over the window "
            f"(collapse above {T.expert_collapse_share:g}).",
            layer_labels,
        )
        self.ranked_share = gauge(
            "expert_load_rank_token_share",
            "Token share of the layer's load_rank-th most loaded expert over the window "
            "(load_rank 1 = the hottest; top N per layer).",
            rank_labels,
        )
        self.ranked_id = gauge(
            "expert_load_rank_expert_id",
            "Logical id of the layer's load_rank-th most loaded expert over the window "
            "(the value is the expert id: join it to the share, never key alerts on it).",
            rank_labels,
        )
        self.max_skew = gauge(
            "expert_max_skew_ratio",
            "The highest per-layer skew of the engine over the window.",
            ["engine"],
        )
        self.collapsed = gauge(
            "expert_collapsed_layers",
            f"Layers whose hottest expert took > {T.expert_collapse_share:g} of the tokens over the window.",
            ["engine"],
        )
        self.rank_load = gauge(
            "expert_rank_load_ratio",
            "Tokens routed to the experts on an EP rank / the mean rank (1 = even).",
            ["engine", "rank"],
        )
        self.eplb = gauge(
            "expert_eplb_balancedness_ratio",
            "vLLM EPLB balancedness (mean/max EP-rank load) from its log.",
            ["engine", "model"],
        )
        self.observed = gauge(
            "expert_layers_observed",
            "MoE layers with routed tokens in the window; 0 while an engine with an expert source "
            "shows none (plugin missing or not writing).",
            ["engine"],
        )
        self.tokens = counter(
            "expert_tokens",
            "Token-to-expert assignments per (layer, expert) since the counters started (opt-in).",
            ["engine", "layer", "expert"],
        )

    def _whatif(self) -> None:
        """The EPLB what-if (docs/experts.md): a handful of series per engine, none per expert.

        ``redundant_experts`` takes the few configured counts (eplb_whatif_redundant), fixed for
        the agent's life: not a value that moves. The smallest count that reaches the target is
        a value; absent when no count in the searched range does (``..._searched_max`` says how
        far it went).
        """
        self.balancedness_today = gauge(
            "expert_rank_balancedness_ratio",
            "EP-rank balancedness today (static placement): sum over layers of the mean rank's "
            "tokens / sum of the busiest rank's, over the window (vLLM EPLB's definition; 1 = even).",
            ["engine"],
        )
        self.whatif = gauge(
            "expert_eplb_whatif_balancedness_ratio",
            "EP-rank balancedness vLLM's EPLB would reach on the window's load with this many "
            "redundant experts (moe-watch what-if, recomputed every eplb_whatif_interval_seconds).",
            ["engine", "redundant_experts"],
        )
        self.needed = gauge(
            "expert_eplb_redundant_needed",
            "Smallest redundant-expert count with which vLLM's EPLB reaches the what-if target "
            f"balancedness (default {T.eplb_whatif_target:g}); absent when none in the searched range.",
            ["engine"],
        )
        self.reached = gauge(
            "expert_eplb_redundant_needed_balancedness_ratio",
            "EP-rank balancedness vLLM's EPLB reaches with expert_eplb_redundant_needed redundant experts.",
            ["engine"],
        )
        self.searched = gauge(
            "expert_eplb_redundant_searched_max",
            "Largest redundant-expert count the what-if tried (the end of its search range).",
            ["engine"],
        )

    def _all2all(self) -> None:
        """Expert-parallel exchange time per forward pass, from the vLLM plugin's files."""
        self.all2all_seconds = Quantiles(
            "expert_all2all_seconds",
            "All-to-all (EP dispatch + combine) time per forward pass over the window, quantiles "
            f"(healthy < {T.all2all_healthy_seconds:g} s, alert > {T.all2all_seconds:g} s).",
            ["engine"],
        )
        self.all2all_passes = gauge(
            "expert_all2all_passes_timed",
            "Forward passes whose all-to-all time was measured in the window.",
            ["engine"],
        )
        self.all2all_info = gauge(
            "expert_all2all_info",
            "The all2all backend the engine's workers use; value is always 1.",
            ["engine", "backend"],
        )

    def _interconnect(self) -> None:
        """NVLink / PCIe topology per GPU, and each engine's interconnect."""
        labels = ["gpu", "engine"]
        self.nvlink_links = gauge(
            "gpu_nvlink_links_up",
            "NVLink links in the active state (0 on a GPU without NVLink).",
            labels,
        )
        self.nvlink_transmit = counter(
            "gpu_nvlink_transmit_bytes",
            "Bytes sent over all the GPU's NVLink links (NVML throughput counter).",
            labels,
        )
        self.nvlink_receive = counter(
            "gpu_nvlink_receive_bytes",
            "Bytes received over all the GPU's NVLink links (NVML throughput counter).",
            labels,
        )
        self.pcie_generation = gauge(
            "gpu_pcie_link_generation", "Current PCIe link generation.", labels
        )
        self.pcie_max_generation = gauge(
            "gpu_pcie_link_max_generation", "Maximum PCIe link generation of GPU and slot.", labels
        )
        self.pcie_width = gauge("gpu_pcie_link_width", "Current PCIe link width (lanes).", labels)
        self.pcie_max_width = gauge(
            "gpu_pcie_link_max_width", "Maximum PCIe link width (lanes).", labels
        )
        self.interconnect = gauge(
            "engine_interconnect_info",
            "How an engine's GPUs reach each other: nvlink (every pair over NVLink) or pcie (some "
            "pair only over PCIe/the host); multi-GPU engines; value is always 1.",
            ["engine", "interconnect"],
        )

    def _plan(self) -> None:
        self.budget = gauge(
            "sized_budget_bytes",
            "Per-GPU memory budget of the engine's plan (moe-watch size).",
            ["engine"],
        )
        self.budget_used = gauge(
            "budget_used_ratio",
            "GPU memory used / the plan's per-GPU budget (> 1: above plan).",
            ["engine", "gpu"],
        )
        self.headroom = gauge(
            "memory_headroom_ratio", "GPU memory still free / total, 0-1.", ["gpu"]
        )
        self.kv_planned = gauge(
            "kv_cache_planned_tokens",
            "KV tokens the engine's plan needs per engine core (DP rank): its max_num_seqs per "
            "rank x max_model_len.",
            ["engine"],
        )
        self.kv_allocated = gauge(
            "kv_cache_allocated_tokens",
            "KV tokens one engine core allocated (vLLM cache_config_info kv_cache_size_tokens, "
            "else num_gpu_blocks x block_size).",
            ["engine"],
        )
        self.kv_max_concurrency = gauge(
            "kv_cache_max_concurrency",
            "Requests of the engine's own max_model_len one engine core's KV cache holds at once "
            "(vLLM cache_config_info kv_cache_max_concurrency).",
            ["engine"],
        )
        self.kv_coverage = gauge(
            "kv_cache_plan_coverage_ratio",
            f"Allocated / planned KV tokens per engine core; below {T.kv_cache_plan_coverage:g} "
            "the engine drifts (kv_cache_tokens): it preempts before its planned concurrency.",
            ["engine"],
        )
        self.drift = gauge(
            "config_drift",
            "1 if the running setting breaks the plan or an MoE rule.",
            ["engine", "setting"],
        )
        self.drift_info = gauge(
            "config_drift_info",
            "A drifted setting: running and expected values; always 1.",
            ["engine", "setting", "running", "expected", "rule"],
        )

    def _groups(self) -> None:
        """For engines whose workers span nodes (experts.engine_group) only: this node's share
        of the engine's window counts, which recording rules sum over nodes into exact
        engine-level signals (rules.py expert_group_rules; docs/experts.md "Engines that span
        nodes").

        Window counts rather than cumulative counters: every agent's window is the same length
        and ends at its last cycle, and a sum of window counts is exact where increase() would
        extrapolate each node's counter over a different scrape alignment. Per (layer, expert) on
        purpose: the hottest expert of a layer is a max over the *sum* across nodes, which no
        per-node summary gives.
        """
        self.group_tokens = gauge(
            "expert_group_window_tokens",
            "Token-to-expert assignments per (layer, expert) routed by this node's workers of the "
            "engine group over the window (summed over nodes by the recording rules).",
            ["engine_group", "layer", "expert"],
        )
        self.group_ranks = gauge(
            "expert_group_rank_window_tokens",
            "Assignments over the window, all layers, to the experts an EP rank holds, routed by "
            "this node's workers of the engine group.",
            ["engine_group", "rank"],
        )
        self.group_expert_id = gauge(
            "expert_group_expert_id",
            "The value is the logical expert id (constant): lets rules turn the expert label into "
            "a number (load-rank ids, ties to the lower id).",
            ["engine_group", "expert"],
        )
        self.group_top_k = gauge(
            "expert_group_top_k", "Experts per token (top-k) of the engine group.", ["engine_group"]
        )
        self.group_info = gauge(
            "expert_group_info",
            "This node's engine is part of the engine group; value is always 1.",
            ["engine", "engine_group"],
        )

    def _batching(self) -> None:
        """The batching curve (one series per model and batch bin with evidence, at most 12)
        and the coverage curve (per tokens-per-step bin, at most 12 per engine)."""
        labels = [*ENGINE_LABELS, "batch"]
        self.batch_tokens = gauge(
            "batch_generation_tokens_per_second_per_gpu",
            "Generated tokens/s per GPU while the running batch was in this bin (aged evidence).",
            labels,
        )
        self.batch_itl = gauge(
            "batch_itl_p95_seconds", "ITL P95 while the running batch was in this bin.", labels
        )
        self.batch_ttft = gauge(
            "batch_ttft_p95_seconds", "TTFT P95 while the running batch was in this bin.", labels
        )
        self.batch_evidence = gauge(
            "batch_evidence_seconds",
            "Seconds the running batch spent in this bin (aged: halved every half-life).",
            labels,
        )
        self.batch_knee = gauge(
            "batch_knee_requests",
            "The batch bin with the most tokens/s per GPU within the ITL P95 SLO; absent on thin "
            "evidence.",
            ENGINE_LABELS,
        )
        self.batch_peak = gauge(
            "batch_knee_peak_reached",
            "1 when a larger batch with evidence did worse than the knee (a measured peak).",
            ENGINE_LABELS,
        )
        coverage = ["engine", "tokens"]
        self.coverage = gauge(
            "expert_coverage_ratio",
            "Mean fraction of a layer's experts a step of this many tokens reached (window).",
            coverage,
        )
        self.coverage_independent = gauge(
            "expert_coverage_independent_ratio",
            "What independent tokens with the window's expert shares would reach; the gap to "
            "expert_coverage_ratio is request locality.",
            coverage,
        )
        self.coverage_steps = gauge(
            "expert_coverage_steps", "Sampled steps in the window, by tokens per step.", coverage
        )
        self.dense_point = gauge(
            "expert_dense_point_tokens",
            f"Smallest tokens-per-step bin whose steps reach >= {T.expert_dense_coverage:g} of "
            "the experts (a dense model's memory reads).",
            ["engine"],
        )

    def in_order(self) -> list[Metric]:
        return [
            self.source_up, self.collect_duration, self.last_success, self.collect_errors,
            self.target_up, self.cycle_duration,
            self.gpu_info, self.gpu_up, self.gpu_utilization, self.gpu_memory_used,
            self.gpu_memory_total, self.gpu_memory_ratio, self.gpu_temperature, self.gpu_power,
            self.xid, self.engine_spread, self.node_spread, self.gpu_allocation,
            self.engine_info, self.max_model_len, *(family for _, family in self.engine_gauges),
            *(family for _, family in self.engine_histograms), self.requests_finished,
            self.skew, self.balance, self.share, self.ranked_share, self.ranked_id,
            self.max_skew, self.collapsed, self.rank_load, self.eplb, self.observed,
            *([self.tokens] if self.full_detail else []),
            self.balancedness_today, self.whatif, self.needed, self.reached, self.searched,
            self.all2all_seconds, self.all2all_passes, self.all2all_info,
            self.nvlink_links, self.nvlink_transmit, self.nvlink_receive, self.pcie_generation,
            self.pcie_max_generation, self.pcie_width, self.pcie_max_width, self.interconnect,
            self.budget, self.budget_used, self.headroom,
            self.kv_planned, self.kv_allocated, self.kv_max_concurrency, self.kv_coverage,
            self.drift, self.drift_info,
            self.group_tokens, self.group_ranks, self.group_expert_id, self.group_top_k,
            self.group_info,
            self.batch_tokens, self.batch_itl, self.batch_ttft, self.batch_evidence,
            self.batch_knee, self.batch_peak,
            self.coverage, self.coverage_independent, self.coverage_steps, self.dense_point,
        ]  # fmt: skip


def _self_part(part: Part, *, f: Families, snap: Snapshot) -> None:
    for status in snap.sources:
        part.add(f.source_up, [status.name], 1.0 if status.up else 0.0)
        part.add(f.collect_duration, [status.name], status.duration_seconds)
        if status.last_success_timestamp is not None:
            part.add(f.last_success, [status.name], status.last_success_timestamp)
        for reason, count in sorted(status.errors_total.items()):
            part.add(f.collect_errors, [status.name, reason], count)
    for record in snap.engines:  # every engine's up state, whatever its own part does
        part.add(f.target_up, [record.name], 1.0 if record.up else 0.0)
    part.add(f.cycle_duration, [], snap.cycle_duration_seconds)


def _gpu_part(part: Part, *, f: Families, view: GpuView, driver: str | None) -> None:
    g = view.sample
    key = [str(g.index), view.engine or ""]
    namespace, pod, container = view.owner or ("", "", "")
    part.add(
        f.gpu_info,
        [str(g.index), g.uuid, g.name, driver or "", view.engine or "", namespace, pod,
         container],
        1,
    )  # fmt: skip
    part.add(f.gpu_up, key, 1.0 if g.up else 0.0)
    for family, value in (
        (f.gpu_utilization, g.utilization_ratio),
        (f.gpu_memory_used, g.memory_used_bytes),
        (f.gpu_memory_total, g.memory_total_bytes),
        (f.gpu_memory_ratio, view.memory_used_ratio),
        (f.gpu_temperature, g.temperature_celsius),
        (f.gpu_power, g.power_watts),
    ):
        if value is not None:
            part.add(family, key, value)
    # One series per kubelet allocation on the GPU: shared GPUs (time-slicing, MIG, DRA) too.
    for device_id, resource, namespace, pod, container in view.allocations:
        part.add(
            f.gpu_allocation,
            [str(g.index), g.uuid, device_id, resource, namespace, pod, container],
            1,
        )
    link = g.link
    if link is not None and g.up:
        for link_family, number in (
            (f.nvlink_links, link.nvlink_links_up),
            (f.nvlink_transmit, link.nvlink_transmit_bytes),
            (f.nvlink_receive, link.nvlink_receive_bytes),
            (f.pcie_generation, link.pcie_generation),
            (f.pcie_max_generation, link.pcie_max_generation),
            (f.pcie_width, link.pcie_width),
            (f.pcie_max_width, link.pcie_max_width),
        ):
            if number is not None:
                part.add(link_family, key, number)
    if view.memory_headroom_ratio is not None:
        part.add(f.headroom, [str(g.index)], view.memory_headroom_ratio)


def _node_part(part: Part, *, f: Families, snap: Snapshot) -> None:
    for (index, code), count in sorted(snap.xid_totals.items()):
        part.add(f.xid, [str(index), str(code)], count)
    if snap.node_gpu_spread is not None:
        part.add(f.node_spread, [], snap.node_gpu_spread)


def _engine_part(part: Part, *, f: Families, record: EngineRecord, full_detail: bool) -> None:
    """Everything one engine publishes (its up state is the agent's part: it always stays)."""
    name = record.name
    namespace, pod = record.pod or ("", "")
    for view in record.views:
        key = [view.engine, view.model]
        part.add(f.engine_info, [*key, view.kind, view.version, namespace, pod], 1)
        if view.max_model_len is not None:
            part.add(f.max_model_len, key, view.max_model_len)
        for attr, family in f.engine_gauges:
            value = getattr(view.signals, attr)
            if value is not None:
                part.add(family, key, value)
        for hist_key, histograms in f.engine_histograms:
            histogram = view.signals.histograms.get(hist_key)
            if histogram is None:
                continue
            for bound, cumulative in histogram.buckets:
                part.add(histograms.bucket, [*key, le_value(bound)], cumulative)
            part.add(histograms.count, key, histogram.count)
            part.add(histograms.sum, key, histogram.sum)
        for reason, total in sorted(view.signals.requests_finished.items()):
            part.add(f.requests_finished, [*key, reason], total)
    if record.experts is not None:
        _expert_samples(part, f, record, full_detail=full_detail)
    elif record.expert_source and EXPERTS not in record.failing:
        part.add(f.observed, [name], 0)  # configured, nothing yet: the plugin missing?
    for model, value in sorted(record.eplb_balancedness.items()):
        part.add(f.eplb, [name, model], value)
    if record.interconnect is not None:
        part.add(f.interconnect, [name, record.interconnect], 1)
    if record.gpu_spread is not None:
        part.add(f.engine_spread, [name], record.gpu_spread)
    if record.budget_bytes is not None:
        part.add(f.budget, [name], record.budget_bytes)
    for index, ratio in record.budget_used:
        part.add(f.budget_used, [name, str(index)], ratio)
    if record.kv_plan is not None:
        _kv_plan_samples(part, f, record.kv_plan, name)
    if record.drift is not None:
        for setting, drifted in record.drift_flags:
            part.add(f.drift, [name, setting], 1.0 if drifted else 0.0)
        for d in record.drift:
            part.add(f.drift_info, [name, d.setting, d.running, d.expected, d.rule], 1)
    _batching_samples(part, f, record)


def _kv_plan_samples(part: Part, f: Families, kv: KvPlan, name: str) -> None:
    """Each figure only where known: no plan, no planned tokens; no allocation, no tokens."""
    if kv.planned is not None:
        part.add(f.kv_planned, [name], kv.planned.tokens)
    if kv.allocated is not None:
        part.add(f.kv_allocated, [name], kv.allocated.tokens)
        if kv.allocated.kv_cache_max_concurrency is not None:
            part.add(f.kv_max_concurrency, [name], kv.allocated.kv_cache_max_concurrency)
    coverage = kv.coverage
    if coverage is not None:
        part.add(f.kv_coverage, [name], coverage.ratio)


def _batching_samples(part: Part, f: Families, record: EngineRecord) -> None:
    for model, answer in sorted(record.batching.items()):
        for point in answer.points:
            key = [record.name, model, str(point.batch_bin)]
            part.add(f.batch_tokens, key, point.tokens_per_second_per_gpu)
            part.add(f.batch_evidence, key, point.seconds)
            if point.itl_p95_seconds is not None:
                part.add(f.batch_itl, key, point.itl_p95_seconds)
            if point.ttft_p95_seconds is not None:
                part.add(f.batch_ttft, key, point.ttft_p95_seconds)
        if answer.knee is not None:
            part.add(f.batch_knee, [record.name, model], answer.knee)
            part.add(f.batch_peak, [record.name, model], 1.0 if answer.peak_reached else 0.0)
    curve = record.experts.coverage if record.experts is not None else None
    if curve is None:
        return
    for b in curve.bins:
        key = [record.name, str(b.tokens_bin)]
        part.add(f.coverage, key, b.observed)
        part.add(f.coverage_steps, key, b.steps)
        if b.independent is not None:
            part.add(f.coverage_independent, key, b.independent)
    if curve.dense_point is not None:
        part.add(f.dense_point, [record.name], curve.dense_point)


def _expert_samples(part: Part, f: Families, record: EngineRecord, *, full_detail: bool) -> None:
    view = record.experts
    assert view is not None
    engine, signals = view.engine, view.signals
    part.add(f.observed, [engine], len(signals.layers))
    for layer in signals.layers:
        key = [engine, str(layer.layer)]
        part.add(f.skew, key, layer.skew)
        part.add(f.balance, key, layer.balancedness)
        part.add(f.share, key, layer.max_share)
        for load_rank, (expert, token_share) in enumerate(layer.ranked, start=1):
            cell = [*key, str(load_rank)]
            part.add(f.ranked_share, cell, token_share)
            part.add(f.ranked_id, cell, expert)
    if signals.max_skew is not None:
        part.add(f.max_skew, [engine], signals.max_skew)
        part.add(f.collapsed, [engine], len(signals.collapsed_layers))
    for ep_rank, load in sorted(signals.rank_load.items()):
        part.add(f.rank_load, [engine, str(ep_rank)], load)
    if full_detail:
        for layer_index, row in zip(view.latest.layers, view.latest.counts, strict=True):
            for expert, count in enumerate(row):
                part.add(f.tokens, [engine, str(layer_index), str(expert)], count)
    if view.whatif is not None:
        result = view.whatif.result
        part.add(f.balancedness_today, [engine], result.balancedness_today)
        for case in result.cases:
            part.add(f.whatif, [engine, str(case.redundant_experts)], case.balancedness)
        if result.searched:
            part.add(f.searched, [engine], result.searched[-1])
        if result.redundant_needed is not None and result.needed_balancedness is not None:
            part.add(f.needed, [engine], result.redundant_needed)
            part.add(f.reached, [engine], result.needed_balancedness)
    if view.latest.all2all is not None:
        part.add(f.all2all_info, [engine, view.latest.all2all_backend], 1)
        part.add(f.all2all_passes, [engine], signals.all2all_passes)
        for q, seconds in sorted(signals.all2all_seconds.items()):
            part.add(f.all2all_seconds, [engine, f"{q:g}"], seconds)
    group = view.engine_group
    if group is not None:
        part.add(f.group_info, [engine, group], 1)
        latest, window = view.latest, signals.window_counts
        if window:  # fewer than two samples: no window yet (absent, never a made-up 0)
            part.add(f.group_top_k, [group], latest.top_k)
            for expert in range(latest.num_experts):
                part.add(f.group_expert_id, [group, str(expert)], expert)
            for layer_index, row in zip(latest.layers, window, strict=True):
                for expert, count in enumerate(row):
                    part.add(f.group_tokens, [group, str(layer_index), str(expert)], count)
            for rank, count in enumerate(view.group_rank_tokens):
                part.add(f.group_ranks, [group, str(rank)], count)


def fallback_body(encoder: Callable[[CollectorRegistry], bytes]) -> bytes:
    """What /metrics serves when no body could be rendered at all and there is no earlier one:
    build_info and ``render_failed{part="all"} 1``, so a scrape is never empty and the failure
    is itself a series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fallback())
    return encoder(registry)


class _Fallback(Collector):
    def collect(self) -> Iterator[Metric]:
        build = gauge("build_info", "moe-watch build; value is always 1.", ["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        failed = gauge("render_failed", RENDER_FAILED_HELP, ["part"])
        failed.add_metric(["all"], 1)
        yield from (build, failed)


def build_registry(
    get_snapshot: Callable[[], Snapshot | None], *, expert_full_detail: bool = False
) -> CollectorRegistry:
    """A fresh registry holding only the snapshot collector (no process/platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(get_snapshot, expert_full_detail=expert_full_detail))
    return registry
