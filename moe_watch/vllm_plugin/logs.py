"""The plugin's logger and its one-warning-per-problem rule (a serving log must not flood)."""

from __future__ import annotations

import logging

log = logging.getLogger("moe_watch.vllm_plugin")

_warned: set[str] = set()


def warn_once(key: str, message: str, *args: object, exc_info: bool = False) -> None:
    """One warning per problem per process: the plugin must not flood a serving log."""
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "moe-watch plugin (vLLM %s): " + message,
        vllm_version(),
        *args,
        exc_info=exc_info,
    )


def vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:
        return "unknown"
