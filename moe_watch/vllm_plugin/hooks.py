"""Where each MoE layer's routing can be observed: vLLM's router ``capture_fn`` hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Routers whose ids are always logical experts in [0, num_experts): no clamp. Any other router
# (zero experts, fused shared experts, custom modules) gets its ids clamped into an overflow
# column, so an unexpected id can never index out of bounds (a device assert would kill serving).
SAFE_ROUTERS = frozenset(
    {
        "FusedTopKRouter",
        "GroupedTopKRouter",
        "FusedTopKBiasRouter",
        "CPURouter",
        "CustomRoutingRouter",
        "RoutingSimulatorRouter",
    }
)


@dataclass
class Hook:
    """One MoE layer's capture point: where the callback lives and how to swap it."""

    layer: int
    owner: Any  # the object holding capture_fn (a router, a routing sink or a custom module)
    kind: str  # "router" | "sink" | "module"
    clamp: bool
    module: Any = None

    def get(self) -> Any:
        return getattr(self.owner, "capture_fn", None)

    def set(self, fn: Callable[[Any], None] | None) -> None:
        if self.kind == "router":
            self.owner.set_capture_fn(fn)
        else:
            self.owner.capture_fn = fn


def find_hooks(model: Any) -> tuple[list[Hook], list[str]]:
    """The capture points of ``model``'s MoE layers, and why any MoE layer has none.

    Mirrors vLLM's bind_routed_experts_capturer: custom modules with their own ``capture_fn``
    and ``layer_id``; ``MoERunner`` modules (``router`` + ``layer_id``) whose router has
    ``set_capture_fn``; monolithic kernels (routing fused into the kernel) only where vLLM's
    own capture already installed a routing sink, because adding one changes the kernel path.
    """
    hooks: list[Hook] = []
    missing: list[str] = []
    seen: set[int] = set()
    for module in model.modules():
        router = getattr(module, "router", None)
        if router is not None and hasattr(module, "layer_id"):
            layer = int(module.layer_id)
            if getattr(module, "is_monolithic", False):
                sink = getattr(getattr(module, "routed_experts", None), "routing_sink", None)
                if sink is not None and hasattr(sink, "capture_fn"):
                    hook = Hook(layer, sink, "sink", clamp=True, module=module)
                else:
                    missing.append(f"layer {layer}: monolithic MoE kernel (routing inside it)")
                    continue
            elif callable(getattr(router, "set_capture_fn", None)) and hasattr(
                router, "capture_fn"
            ):
                clamp = type(router).__name__ not in SAFE_ROUTERS
                hook = Hook(layer, router, "router", clamp=clamp, module=module)
            else:
                missing.append(f"layer {layer}: {type(router).__name__} has no set_capture_fn")
                continue
        elif (
            hasattr(module, "capture_fn")
            and hasattr(module, "layer_id")
            and not callable(getattr(module, "set_capture_fn", None))
        ):
            hook = Hook(int(module.layer_id), module, "module", clamp=True, module=module)
        else:
            continue
        if hook.layer in seen:
            missing.append(f"layer {hook.layer}: a second MoE block (only the first is counted)")
            continue
        seen.add(hook.layer)
        hooks.append(hook)
    hooks.sort(key=lambda h: h.layer)
    return hooks, missing
