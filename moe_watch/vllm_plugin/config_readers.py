"""Reading vLLM's configuration and parallel layout, failing soft (attributes move between
releases: a missing one gives a default, never an exception into vLLM)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_watch.vllm_plugin.logs import log, warn_once

DEFAULT_INTERVAL_SECONDS = 2.0


@dataclass
class Layout:
    """This worker's place in the parallel layout (what it counts and what the file says)."""

    dp_rank: int = 0
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    ep_size: int = 1
    sp_size: int = 1  # > 1: sequence-parallel MoE, each TP rank routes its own shard
    pcp_size: int = 1


def call_int(obj: Any, method: str) -> int:
    try:
        return int(getattr(obj, method)())
    except Exception:
        return 0


# In vLLM's compile-cache key (additional_config is hashed into VllmConfig.compute_hash).
COMPILE_CACHE_MARK = ("moe_watch_expert_counts", "1")


def traced_platform(device: Any) -> bool:
    """Whether vLLM calls the MoE layer directly (not its opaque custom op): CPU and TPU."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu() or current_platform.is_tpu())
    except Exception:
        return str(getattr(device, "type", device)) == "cpu"


def mark_compile_cache(vllm_config: Any) -> None:
    """Key vLLM's torch.compile cache on the plugin being on (our callback is in the graph)."""
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict):
        key, value = COMPILE_CACHE_MARK
        extra[key] = value
    else:
        warn_once(
            "cache-key",
            "cannot mark the compile cache (additional_config is not a dict)",
        )


def logical_experts(module: Any) -> int:
    config = getattr(module, "moe_config", None)
    return int(getattr(config, "num_logical_experts", 0) or 0)


def device_of(module: Any) -> Any:
    for parameter in module.parameters():
        return parameter.device
    config_device = getattr(getattr(module, "moe_config", None), "device", None)
    return config_device if config_device is not None else "cpu"


def served_model_name(model_config: Any) -> str:
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name or "")


def cap_tokens(vllm_config: Any) -> int:
    """Token positions the weights cover: a step's tokens on this rank, padding included."""
    scheduled = int(
        getattr(getattr(vllm_config, "scheduler_config", None), "max_num_batched_tokens", 0) or 0
    )
    graphs = int(
        getattr(
            getattr(vllm_config, "compilation_config", None),
            "max_cudagraph_capture_size",
            0,
        )
        or 0
    )
    return 2 * max(scheduled, graphs, 8192) + 64


def interval_seconds() -> float:
    raw = os.environ.get("MOE_WATCH_PLUGIN_INTERVAL_SECONDS", "")
    try:
        value = float(raw) if raw else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        value = DEFAULT_INTERVAL_SECONDS
    return max(0.1, value)


def layout(vllm_config: Any, module: Any) -> Layout:
    result = Layout()
    parallel = getattr(vllm_config, "parallel_config", None)
    result.dp_rank = int(getattr(parallel, "data_parallel_rank", 0) or 0)
    result.dp_size = int(getattr(parallel, "data_parallel_size", 1) or 1)
    try:
        from vllm.distributed import parallel_state as ps

        result.tp_rank = int(ps.get_tensor_model_parallel_rank())
        result.pp_rank = int(ps.get_pp_group().rank_in_group)
    except Exception:  # not initialised (a single process) or renamed: rank 0
        log.debug("moe-watch plugin: parallel ranks unavailable", exc_info=True)
    moe_parallel = getattr(getattr(module, "moe_config", None), "moe_parallel_config", None)
    if moe_parallel is not None:
        if getattr(moe_parallel, "use_ep", False):
            result.ep_rank = int(getattr(moe_parallel, "ep_rank", 0) or 0)
            result.ep_size = int(getattr(moe_parallel, "ep_size", 1) or 1)
        result.sp_size = int(getattr(moe_parallel, "sp_size", 1) or 1)
        result.pcp_size = int(getattr(moe_parallel, "pcp_size", 1) or 1)
    return result


def forward_context_getter() -> Callable[[], Any]:
    from vllm.forward_context import get_forward_context

    def context() -> Any:
        try:
            return get_forward_context()
        except Exception:  # no context set: not inside a model step
            return None

    return context


def all2all_backend(vllm_config: Any) -> str:
    """vLLM's ``parallel_config.all2all_backend`` (e.g. ``allgather_reducescatter``,
    ``deepep_low_latency``), or "" where it is not there."""
    parallel = getattr(vllm_config, "parallel_config", None)
    return str(getattr(parallel, "all2all_backend", "") or "")
