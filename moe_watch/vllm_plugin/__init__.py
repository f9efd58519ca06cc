"""The moe-watch vLLM plugin: counts the tokens routed to every (MoE layer, logical expert).

vLLM loads ``vllm.general_plugins`` entry points in every process (API server, engine core,
workers). ``register()`` is cheap and imports nothing heavy: it arranges for vLLM's worker
classes to be patched when vLLM imports them, so only processes that run a model count.
Patching the worker (not the model runner) covers both model runners (V1, and V2, the default
on GPUs in vLLM 0.32) and sees where warm-up ends (``compile_or_warm_up_model``).
Nothing here may break serving: a missing hook is logged once and the plugin stays off.
See docs/vllm-plugin.md.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger("moe_watch.vllm_plugin")

# The worker classes of vLLM 0.3x whose load_model / compile_or_warm_up_model / execute_model /
# execute_dummy_batch we wrap (a subclass is listed when it overrides one of them).
WORKER_CLASSES = {
    "vllm.v1.worker.gpu_worker": "Worker",
    "vllm.v1.worker.cpu_worker": "CPUWorker",
    "vllm.v1.worker.xpu_worker": "XPUWorker",
}
# Wrapped on the base Worker; without them the plugin cannot work on this vLLM.
REQUIRED_METHODS = ("load_model", "compile_or_warm_up_model", "execute_model")
_registered = False


def enabled() -> bool:
    value = os.environ.get("MOE_WATCH_PLUGIN", "1").strip().lower()
    return value not in ("0", "false", "off", "no")


def register() -> None:
    """Entry point (vllm.general_plugins). Idempotent: vLLM may call it more than once."""
    global _registered
    if _registered or not enabled():
        return
    _registered = True
    try:
        _log_like_vllm()
        for name, class_name in WORKER_CLASSES.items():
            module = sys.modules.get(name)
            if module is not None:  # imported before the plugin loaded: patch it now
                _patch_module(module, class_name)
        sys.meta_path.insert(0, _WorkerImportHook())
    except Exception:  # never break vLLM start-up
        log.warning("moe-watch plugin disabled: could not install its hooks", exc_info=True)


def _log_like_vllm() -> None:
    """Our lines go where vLLM's go, in its format (they are not propagated to the root)."""
    vllm_logger = logging.getLogger("vllm")
    if log.handlers or not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        log.addHandler(handler)
    log.setLevel(vllm_logger.getEffectiveLevel())
    log.propagate = False


def _patch_module(module: ModuleType, class_name: str) -> None:
    from moe_watch.vllm_plugin.logs import warn_once
    from moe_watch.vllm_plugin.worker import patch_worker_class

    worker = getattr(module, class_name, None)
    if worker is None:
        warn_once(
            f"class:{module.__name__}",
            "%s has no %s: workers of that kind will not count experts",
            module.__name__,
            class_name,
        )
        return
    patch_worker_class(worker)
    if class_name == "Worker":
        absent = [name for name in REQUIRED_METHODS if not callable(getattr(worker, name, None))]
        if absent:
            warn_once(
                "methods",
                "%s.%s lacks %s; expert counting is off",
                module.__name__,
                class_name,
                ", ".join(absent),
            )


class _WorkerImportHook(importlib.abc.MetaPathFinder):
    """Patches a worker module right after vLLM imports it (no heavy import of ours)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if fullname not in WORKER_CLASSES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, WORKER_CLASSES[fullname])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, class_name: str) -> None:
        self._inner = inner
        self._class_name = class_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        try:
            _patch_module(module, self._class_name)
        except Exception:
            log.warning(
                "moe-watch plugin disabled: patching %s failed", module.__name__, exc_info=True
            )
