"""Inside a vLLM worker: bind to the MoE routers, count on the device, publish periodically.

Counting: vLLM's routers (BaseRouter subclasses) call ``capture_fn(topk_ids)`` with *logical*
expert ids, before any EPLB mapping, from inside the MoE custom op (eager even when the model is
compiled). We add one per (token, chosen expert) into a persistent [layers, experts] int64
tensor on the same device with ``index_add_``: no host sync in the step. A daemon thread copies
the tensor out every few seconds and writes it with ``moe_watch.expert_file``.

Warm-up: profiling, compile warm-up and CUDA-graph capture route dummy tokens. The counts
published are "accumulator minus a baseline taken at the first real ``execute_model``".
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

from moe_watch.expert_file import SUFFIX, CountsFile, write_counts_file

log = logging.getLogger("moe_watch.vllm_plugin")

DEFAULT_DIR = "/tmp/moe-watch/experts"


def patch_runner_class(runner: Any) -> None:
    """Wrap ``load_model`` (bind after the model exists) and ``execute_model`` (baseline)."""
    if runner.__dict__.get("_moe_watch_patched", False):  # not inherited: subclasses too
        return
    original_load = runner.__dict__.get("load_model")
    if original_load is not None:

        def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original_load(self, *args, **kwargs)
            try:
                ExpertCounter.attach(self)
            except Exception:
                log.warning(
                    "moe-watch plugin: not counting experts (binding failed)", exc_info=True
                )
            return result

        runner.load_model = load_model
    original_execute = runner.__dict__.get("execute_model")
    if original_execute is not None:

        def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter = getattr(self, "_moe_watch_counter", None)
            if counter is not None and counter.baseline is None:
                counter.take_baseline()  # the first real step: warm-up traffic ends here
            return original_execute(self, *args, **kwargs)

        runner.execute_model = execute_model
    runner._moe_watch_patched = True


class ExpertCounter:
    def __init__(
        self, runner: Any, moe_modules: list[tuple[int, Any]], top_k: int, num_experts: int
    ) -> None:
        import torch

        self.layers = [layer for layer, _ in moe_modules]
        self.top_k = top_k
        self.num_experts = num_experts
        device = moe_modules[0][1].router_device
        self.accumulator = torch.zeros(
            (len(self.layers), num_experts), dtype=torch.int64, device=device
        )
        self.baseline: Any = None
        self.started = time.time()
        self.model = _served_model_name(runner)
        self.ranks = _ranks()
        self.path = Path(os.environ.get("MOE_WATCH_EXPERTS_DIR", DEFAULT_DIR)) / (
            f"{socket.gethostname()}-{os.getpid()}{SUFFIX}"
        )
        self.interval = float(os.environ.get("MOE_WATCH_PLUGIN_INTERVAL_SECONDS", "2"))
        self._stop = threading.Event()

    @classmethod
    def attach(cls, runner: Any) -> ExpertCounter | None:
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        found: list[tuple[int, Any]] = []
        for module in model.modules():
            router = getattr(module, "router", None)
            if (
                router is None
                or not hasattr(router, "set_capture_fn")
                or not hasattr(module, "layer_id")
            ):
                continue
            found.append((int(module.layer_id), module))
        if not found:
            log.warning(
                "moe-watch plugin: no MoE router with a capture hook in this model; not counting"
            )
            return None
        first = found[0][1]
        top_k = int(first.router.top_k)
        num_experts = int(
            getattr(first.moe_config, "num_logical_experts", 0) or first.router.global_num_experts
        )
        for _, module in found:
            module.router_device = _device_of(module)
        counter = cls(runner, found, top_k, num_experts)
        for index, (_, module) in enumerate(found):
            previous = getattr(module.router, "capture_fn", None)
            module.router.set_capture_fn(partial(counter.capture, index, previous))
        runner._moe_watch_counter = counter
        counter.start()
        log.info(
            "moe-watch plugin counting %d MoE layers x %d experts (top-%d) into %s",
            len(found),
            num_experts,
            top_k,
            counter.path,
        )
        return counter

    def capture(self, index: int, previous: Any, topk_ids: Any) -> None:
        import torch

        flat = topk_ids.reshape(-1).to(torch.int64)
        self.accumulator[index].index_add_(0, flat, torch.ones_like(flat))
        if previous is not None:  # vLLM's own capturer (--enable-return-routed-experts) too
            previous(topk_ids)

    def take_baseline(self) -> None:
        self.baseline = self.accumulator.clone()
        self.started = time.time()

    def counts(self) -> list[list[int]]:
        current = self.accumulator.to("cpu")
        if self.baseline is None:
            return [[0] * self.num_experts for _ in self.layers]
        return (current - self.baseline.to("cpu")).tolist()  # type: ignore[no-any-return]

    def start(self) -> None:
        self.publish()
        threading.Thread(target=self._run, name="moe-watch-experts", daemon=True).start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except Exception:
                log.warning(
                    "moe-watch plugin: publishing expert counts failed; stopping", exc_info=True
                )
                return

    def publish(self) -> None:
        write_counts_file(
            self.path,
            CountsFile(
                pid=os.getpid(),
                started=self.started,
                updated=time.time(),
                model=self.model,
                top_k=self.top_k,
                num_experts=self.num_experts,
                layers=self.layers,
                counts=self.counts(),
                vllm_version=_vllm_version(),
                dp_rank=self.ranks["dp_rank"],
                tp_rank=self.ranks["tp_rank"],
                pp_rank=self.ranks["pp_rank"],
                ep_rank=self.ranks["ep_rank"],
                ep_size=self.ranks["ep_size"],
            ),
        )

    def close(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def _device_of(module: Any) -> Any:
    for parameter in module.parameters():
        return parameter.device
    import torch

    return torch.device("cpu")


def _served_model_name(runner: Any) -> str:
    config = getattr(getattr(runner, "vllm_config", None), "model_config", None)
    name = getattr(config, "served_model_name", None) or getattr(config, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else ""
    return str(name)


def _ranks() -> dict[str, int]:
    ranks = {"dp_rank": 0, "tp_rank": 0, "pp_rank": 0, "ep_rank": 0, "ep_size": 1}
    try:
        from vllm.distributed import parallel_state as ps

        ranks["tp_rank"] = ps.get_tensor_model_parallel_rank()
        ranks["pp_rank"] = ps.get_pp_group().rank_in_group
        ranks["dp_rank"] = ps.get_dp_group().rank_in_group
        ep = ps.get_ep_group()
        ranks["ep_rank"], ranks["ep_size"] = ep.rank_in_group, ep.world_size
    except Exception:  # groups not initialised (single process) or renamed: single rank
        log.debug("moe-watch plugin: parallel ranks unavailable", exc_info=True)
    return ranks


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return ""
