"""The expert-parallel MoE block: routers, expert placement, dispatch backends, grouped experts.

Names load on first use, so that `config` can check a layout against the registries here
(`backends.DISPATCH_BACKENDS`, `expert_map.PLACEMENTS`) without importing the layers."""

import importlib

_EXPORTS = {"MoELayer": "layer", "Router": "router", "RoutingStats": "stats", "collect_routing_stats": "stats",
            "moe_layers": "layer", "reset_token_counts": "layer"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
