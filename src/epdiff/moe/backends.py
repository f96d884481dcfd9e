"""The registry of dispatch backends (`--all2all-backend NAME`): each name -> its `Dispatcher`
class, as "module:Class", imported when first asked for (so that the layout can be checked
against the names before any MoE code is loaded). Adding a backend: a `Dispatcher` subclass
(moe/dispatch.py has the interface and the two here) and one line below."""

from __future__ import annotations

import importlib

DISPATCH_BACKENDS = {
    "allgather_reducescatter": "epdiff.moe.dispatch:AllGatherReduceScatter",
    "alltoall": "epdiff.moe.dispatch:AllToAll",
}
DEFAULT_DISPATCH_BACKEND = "allgather_reducescatter"


def dispatcher_class(name: str):
    module, _, cls = DISPATCH_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
