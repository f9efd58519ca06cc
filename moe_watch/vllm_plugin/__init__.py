"""The moe-watch vLLM plugin: counts the tokens routed to every (MoE layer, logical expert).

vLLM loads ``vllm.general_plugins`` entry points in every process (API server, engine core,
workers). ``register()`` is cheap and imports nothing heavy: it arranges for the model runner
classes to be patched when vLLM imports them, so only processes that load a model count.
Nothing here may break serving: every failure is logged once and the plugin stays off.
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

# Where vLLM 0.3x defines the runners whose load_model/execute_model we wrap.
RUNNER_MODULES = {
    "vllm.v1.worker.gpu_model_runner": "GPUModelRunner",
    "vllm.v1.worker.cpu_model_runner": "CPUModelRunner",
}
_registered = False


def enabled() -> bool:
    return os.environ.get("MOE_WATCH_PLUGIN", "1").strip().lower() not in (
        "0",
        "false",
        "off",
        "no",
    )


def register() -> None:
    """Entry point (vllm.general_plugins). Idempotent: vLLM may call it more than once."""
    global _registered
    if _registered or not enabled():
        return
    _registered = True
    try:
        for name, cls in RUNNER_MODULES.items():
            module = sys.modules.get(name)
            if module is not None:
                _patch_module(module, cls)
        sys.meta_path.insert(0, _RunnerImportHook())
    except Exception:  # never break vLLM start-up
        log.warning("moe-watch plugin disabled: could not install its hooks", exc_info=True)


def _patch_module(module: ModuleType, class_name: str) -> None:
    from moe_watch.vllm_plugin.counter import patch_runner_class

    runner = getattr(module, class_name, None)
    if runner is None:
        log.warning(
            "moe-watch plugin: %s has no %s; this vLLM is not supported",
            module.__name__,
            class_name,
        )
        return
    patch_runner_class(runner)


class _RunnerImportHook(importlib.abc.MetaPathFinder):
    """Patches a runner module right after vLLM imports it (no heavy import of ours)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        if fullname not in RUNNER_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, RUNNER_MODULES[fullname])
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
