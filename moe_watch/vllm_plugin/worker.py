"""The vLLM worker methods the counter wraps: bind after load_model, stay off during warm-up,
weight each real step's tokens, and treat DP dummy batches as no traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_watch.vllm_plugin.counter import COUNTER_ATTRIBUTE, ExpertCounter
from moe_watch.vllm_plugin.logs import warn_once


def patch_worker_class(worker: Any) -> list[str]:
    """Wrap the worker methods the counter needs; returns the names wrapped.

    Only methods defined on this class itself are wrapped (a subclass that overrides one is
    patched separately), and a class is patched once.
    """
    if worker.__dict__.get("_moe_watch_patched", False):
        return []
    wrapped = []
    for name, make in (
        ("load_model", _wrap_load_model),
        ("compile_or_warm_up_model", _wrap_warm_up),
        ("execute_model", _wrap_execute_model),
        ("execute_dummy_batch", _wrap_dummy_batch),
    ):
        original = worker.__dict__.get(name)
        if callable(original):
            setattr(worker, name, make(original))
            wrapped.append(name)
    worker._moe_watch_patched = True
    return wrapped


def _counter_of(worker: Any) -> ExpertCounter | None:
    counter = worker.__dict__.get(COUNTER_ATTRIBUTE)
    return counter if isinstance(counter, ExpertCounter) and not counter.failed else None


def _wrap_load_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            ExpertCounter.attach(self)
        except Exception:
            warn_once(
                "attach",
                "not counting experts: binding to the model failed",
                exc_info=True,
            )
        return result

    return load_model


def _wrap_warm_up(original: Callable[..., Any]) -> Callable[..., Any]:
    def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter = _counter_of(self)
        if counter is None:
            return original(self, *args, **kwargs)
        counter.warm_up_begins()
        try:
            with counter.lock:
                result = original(self, *args, **kwargs)
        except BaseException:
            counter.warm_up_ends(succeeded=False)
            raise
        counter.warm_up_ends(succeeded=True)
        return result

    return compile_or_warm_up_model


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        counter = self.__dict__.get(COUNTER_ATTRIBUTE)
        if counter is None:
            return original(self, scheduler_output, *args, **kwargs)
        with counter.lock:
            counter.begin_step(scheduler_output)
            try:
                result = original(self, scheduler_output, *args, **kwargs)
            except BaseException:
                counter.end_step(completed=False)
                raise
            counter.end_step()
            return result

    return execute_model


def _wrap_dummy_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_dummy_batch(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter = self.__dict__.get(COUNTER_ATTRIBUTE)
        if counter is None:
            return original(self, *args, **kwargs)
        with counter.lock:
            try:
                counter.set_limit(0)  # an idle DP rank's filler step is not traffic
            except Exception:
                counter.fail("preparing a dummy batch failed")
            return original(self, *args, **kwargs)

    return execute_dummy_batch
