"""Configuration drift: the running engine against its plan and against the MoE rules (pure).

Running values come from the engine's exposition (vLLM ``cache_config_info`` labels),
``/v1/models`` (max_model_len) and its command line (read by ``sources/proc.py`` for the NVML
PIDs of its GPUs). Rules (the design notes, docs/design.md): gpu_memory_utilization above 0.80 on a
large MoE or >= 0.95 anywhere; max_num_seqs above the engine's measured knee (the batch size
where its tokens/s per GPU peaks within the ITL SLO, signals/batching.py) once there is one,
else above 8 on a large MoE (the static rule); max_model_len far above the
plan; prefix caching with an FP8 KV cache; expert parallelism off on a multi-GPU MoE; expert
parallelism on GPUs without NVLink (the interconnect is given by the agent, from NVML); dtype or
GPU count differing from the plan; a KV cache holding materially less than the plan needs
(``kv_cache_tokens``: allocated / planned tokens per engine core below
``thresholds.kv_cache_plan_coverage``, sizing/allocated.py). No plan: only the rules apply.

vLLM's ``max_num_seqs`` (``--max-num-seqs``) is per DP rank, and so is every comparison here:
the static rule judges the flag as it is, and a plan's ``max_num_seqs`` (its target for the
whole deployment) is compared as the plan's sequences per rank (``seqs_per_rank``).

A running value that is not a finite number in its range (``--max-num-seqs nan``, ``1e400``, a
negative GPU memory fraction) is refused: it is unknown, and ``Running.refused`` names it so
the agent counts it (``bad_value``). Anything a neighbour can put on a command line ends here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from moe_watch import limits
from moe_watch.signals.batching import BatchAnswer
from moe_watch.signals.power_bins import BINS, bin_edges
from moe_watch.sizing.allocated import KvCoverage
from moe_watch.sizing.catalog import ModelSpec, UnknownModel, find_model
from moe_watch.sizing.plan import PlanFile
from moe_watch.thresholds import DEFAULT as T

MAX_MODEL_LEN_FACTOR = 2.0  # "far above the plan"

# Every setting find_drift checks, in name order: the agent exports each for every engine it
# checks (0 = fine), so alerts and dashboards see them before anything drifts.
SETTINGS = (
    "dtype",
    "enable_expert_parallel",
    "enable_prefix_caching",
    "gpu_memory_utilization",
    "gpus",
    "interconnect",
    "kv_cache_tokens",
    "max_model_len",
    "max_num_seqs",
)


@dataclass(frozen=True, slots=True)
class Running:
    """What one engine runs with; None where it could not be observed."""

    model: str | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool | None = None
    kv_cache_dtype: str | None = None
    dtype: str | None = None
    expert_parallel: bool | None = None
    gpus: int | None = None
    interconnect: str | None = None  # "nvlink" | "pcie": how its GPUs reach each other (NVML)
    # Settings whose observed value was refused (not a finite number in its range), as
    # "setting=value"; their fields above are None.
    refused: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Drift:
    setting: str
    running: str
    expected: str
    rule: str

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:  # one list of settings: SETTINGS above
            raise ValueError(f"drift setting {self.setting!r} is not in drift.SETTINGS")


def setting_flags(findings: Iterable[Drift]) -> tuple[tuple[str, bool], ...]:
    """Every checked setting, in name order, and whether ``findings`` say it drifted."""
    drifted = {d.setting for d in findings}
    return tuple((setting, setting in drifted) for setting in SETTINGS)


def running_from(
    cache_config: Mapping[str, str],
    cmdline: Sequence[str] | None,
    max_model_len: int | None,
    gpus: int | None,
    *,
    ep_size: int | None = None,
    interconnect: str | None = None,
) -> Running:
    """What an engine runs with. ``ep_size``: the expert-parallel size its plugin files report
    (expert parallelism is on even where the command line cannot be read); ``interconnect``: how
    its GPUs reach each other (NVML)."""
    args = parse_vllm_args(cmdline or ())
    numbers = _Numbers()
    expert_parallel = ("--enable-expert-parallel" in args) if cmdline else None
    if ep_size is not None and ep_size > 1:
        expert_parallel = True
    prefix = _bool(cache_config.get("enable_prefix_caching"))
    if "--no-enable-prefix-caching" in args:
        prefix = False
    return Running(
        model=args.get("--served-model-name") or args.get("--model") or args.get("model"),
        gpu_memory_utilization=numbers.read(
            "gpu_memory_utilization",
            cache_config.get("gpu_memory_utilization") or args.get("--gpu-memory-utilization"),
            high=1.0,
        ),
        max_num_seqs=numbers.integer("max_num_seqs", args.get("--max-num-seqs"), limits.NUM_SEQS),
        max_model_len=max_model_len
        or numbers.integer("max_model_len", args.get("--max-model-len"), limits.MODEL_LEN),
        enable_prefix_caching=prefix,
        kv_cache_dtype=_kv_dtype(cache_config.get("cache_dtype"))
        or _kv_dtype(args.get("--kv-cache-dtype")),
        dtype=_dtype(args.get("--dtype")),
        expert_parallel=expert_parallel,
        gpus=gpus,
        interconnect=interconnect,
        refused=tuple(numbers.refused),
    )


class _Numbers:
    """Reads running values as numbers in their range; keeps what it refused."""

    def __init__(self) -> None:
        self.refused: list[str] = []

    def read(self, setting: str, text: str | None, *, high: float) -> float | None:
        """A number in [0, high]. Text that is no number at all (a form this parser does not
        know) is unknown; a number outside the range, NaN or infinite is refused."""
        if text is None or text in ("", "None"):
            return None
        try:
            value = float(text)
        except ValueError:
            return None
        if not (math.isfinite(value) and 0 <= value <= high):
            self.refused.append(f"{setting}={text[:32]}")
            return None
        return value

    def integer(self, setting: str, text: str | None, high: int) -> int | None:
        """A whole number in [1, high]."""
        value = self.read(setting, text, high=high)
        if value is None:
            return None
        if value < 1 or not value.is_integer():
            self.refused.append(f"{setting}={str(text)[:32]}")
            return None
        return int(value)


def parse_vllm_args(cmdline: Sequence[str]) -> dict[str, str]:
    """`vllm serve MODEL --flag value --switch ...` or `python -m vllm.entrypoints... --model M`."""
    args: dict[str, str] = {}
    tokens = list(cmdline)
    if "serve" in tokens:
        after = tokens[tokens.index("serve") + 1 :]
        if after and not after[0].startswith("-"):
            args["model"] = after[0]
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-"):
            if "=" in token:
                key, value = token.split("=", 1)
                args[key] = value
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("-"):
                args[token] = tokens[i + 1]
                i += 1
            else:
                args[token] = "true"
        i += 1
    return args


# Which rule judged max_num_seqs (``max_num_seqs_rule``), for /status.
MEASURED_KNEE = "measured_knee"
STATIC_RULE = "static_rule"


def max_num_seqs_rule(knee: BatchAnswer | None) -> str:
    """The measured knee decides once it is a real peak with evidence (signals/batching.py);
    until then the design notes' static rule (large MoE: 4-8) does."""
    if knee is not None and knee.knee is not None and knee.peak_reached:
        return MEASURED_KNEE
    return STATIC_RULE


def find_drift(
    running: Running,
    plan: PlanFile | None = None,
    spec: ModelSpec | None = None,
    *,
    knee: BatchAnswer | None = None,
    kv: KvCoverage | None = None,
    seqs_per_rank: int | None = None,
) -> list[Drift]:
    """``knee``: the engine's batching curve; where it has a measured peak, max_num_seqs is
    judged against it instead of the static rule. ``kv``: the plan's KV tokens against the
    engine's allocation. ``seqs_per_rank``: the plan's sequences per DP rank under its sized
    layout (else its target over its given ``data_parallel_size``)."""
    spec = spec or _spec_for(running.model)
    large = spec.is_large if spec is not None else False
    found: list[Drift] = []
    gmu = running.gpu_memory_utilization
    if gmu is not None:
        if gmu >= T.gpu_memory_utilization_max:
            found.append(
                Drift(
                    "gpu_memory_utilization",
                    f"{gmu:g}",
                    f"< {T.gpu_memory_utilization_max:g}",
                    f"{T.gpu_memory_utilization_max:g}+ leaves no room for KV-cache spikes",
                )
            )
        elif large and gmu > T.gpu_memory_utilization_large_moe:
            found.append(
                Drift(
                    "gpu_memory_utilization",
                    f"{gmu:g}",
                    f"<= {T.gpu_memory_utilization_large_moe:g}",
                    "large MoE: 0.75-0.80",
                )
            )
    seqs_limit = int(T.max_num_seqs_large_moe)
    seqs = running.max_num_seqs
    if max_num_seqs_rule(knee) == MEASURED_KNEE:
        assert knee is not None
        assert knee.knee is not None
        _, high = bin_edges(BINS.index(knee.knee))
        most = math.ceil(high) - 1  # the knee's bin ends here (the last bin never ends)
        if seqs is not None and math.isfinite(high) and seqs > most:
            found.append(
                Drift(
                    "max_num_seqs",
                    str(seqs),
                    f"<= {most}",
                    f"measured knee: tokens/s per GPU peaks at batch {knee.knee} with ITL P95 "
                    f"within {knee.slo_seconds:g} s; larger batches did worse",
                )
            )
    elif large and seqs is not None and seqs > seqs_limit:
        found.append(
            Drift("max_num_seqs", str(seqs), f"<= {seqs_limit}", "large MoE: start at 4-8")
        )
    if running.enable_prefix_caching and running.kv_cache_dtype == "fp8":
        found.append(
            Drift(
                "enable_prefix_caching",
                "true",
                "false",
                "prefix caching is not compatible with an FP8 KV cache",
            )
        )
    gpus = running.gpus or (plan.gpus if plan else None)
    if running.expert_parallel is False and gpus is not None and gpus > 1:
        found.append(
            Drift(
                "enable_expert_parallel",
                "false",
                "true",
                "multi-GPU MoE: enable expert parallelism",
            )
        )
    if running.expert_parallel and running.interconnect == "pcie":
        found.append(
            Drift(
                "interconnect",
                "pcie",
                "nvlink",
                "expert parallelism on GPUs without NVLink: every MoE layer's all-to-all "
                "crosses PCIe (~128 GB/s vs NVLink's 900 GB/s)",
            )
        )
    if kv is not None and kv.short(T.kv_cache_plan_coverage):
        found.append(_kv_short(kv, running.max_model_len))
    if plan is not None:
        found.extend(_against_plan(running, plan, seqs_per_rank))
    return found


def _kv_short(kv: KvCoverage, engine_len: int | None) -> Drift:
    """The engine holds materially less KV than its plan needs: it preempts before it reaches
    the planned concurrency."""
    own = ""
    if kv.engine_max_concurrency is not None and engine_len is not None:
        own = f"; vLLM: {kv.engine_max_concurrency:g} at its max_model_len {engine_len}"
    return Drift(
        "kv_cache_tokens",
        str(kv.allocated_tokens),
        f">= {math.ceil(T.kv_cache_plan_coverage * kv.planned_tokens)}",
        f"{kv.sequences_at_planned_len} sequences of {kv.planned_max_model_len} tokens fit in "
        f"the KV cache, the plan needs {kv.planned_seqs} per DP rank "
        f"({kv.planned_tokens} tokens, allocated {kv.ratio:.2f} of it){own}: it preempts "
        "before its planned concurrency",
    )


def _against_plan(running: Running, plan: PlanFile, seqs_per_rank: int | None) -> list[Drift]:
    found: list[Drift] = []
    expected = plan.vllm
    if (
        expected.max_model_len
        and running.max_model_len
        and running.max_model_len > MAX_MODEL_LEN_FACTOR * expected.max_model_len
    ):
        found.append(
            Drift(
                "max_model_len",
                str(running.max_model_len),
                str(expected.max_model_len),
                "far above the plan (KV budget)",
            )
        )
    if running.dtype is not None and running.dtype != plan.dtype:
        found.append(Drift("dtype", running.dtype, plan.dtype, "differs from the plan"))
    if running.gpus is not None and running.gpus != plan.gpus:
        found.append(Drift("gpus", str(running.gpus), str(plan.gpus), "differs from the plan"))
    per_rank = None  # vLLM's flag is per DP rank; the plan's max_num_seqs is the deployment's
    if expected.max_num_seqs is not None:
        per_rank = seqs_per_rank or math.ceil(
            expected.max_num_seqs / (plan.data_parallel_size or 1)
        )
    wanted = {"gpu_memory_utilization": expected.gpu_memory_utilization, "max_num_seqs": per_rank}
    for setting, want in wanted.items():
        have = getattr(running, setting)
        if (
            want is not None
            and have is not None
            and have != want
            and not any(d.setting == setting for d in found)
        ):
            found.append(
                Drift(
                    setting,
                    f"{have:g}" if isinstance(have, float) else str(have),
                    f"{want:g}" if isinstance(want, float) else str(want),
                    "differs from the plan",
                )
            )
    return found


def _spec_for(model: str | None) -> ModelSpec | None:
    if not model:
        return None
    for candidate in (model, model.rsplit("/", 1)[-1]):
        try:
            return find_model(candidate)
        except UnknownModel:
            continue
    return None


def _bool(value: str | None) -> bool | None:
    return None if value in (None, "", "None") else str(value).lower() == "true"


def _kv_dtype(value: str | None) -> str | None:
    if not value or value == "auto":
        return None
    return "fp8" if value.startswith("fp8") else value


def _dtype(value: str | None) -> str | None:
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    return aliases.get(value, value) if value and value != "auto" else None
