"""The one way tests write a parallel layout: `layout(tp=2, cfg=2, ep=True)` is a ParallelConfig
(picklable, so the world's workers take it as it is)."""

from __future__ import annotations

import itertools

from epdiff.config import ParallelConfig
from epdiff.moe.backends import DEFAULT_DISPATCH_BACKEND, DISPATCH_BACKENDS
from epdiff.moe.expert_map import DEFAULT_PLACEMENT, PLACEMENTS

BACKENDS = tuple(DISPATCH_BACKENDS)  # every registered dispatch backend
PLACEMENT_NAMES = tuple(PLACEMENTS)


def layout(tp=1, sp=1, cfg=1, dp=1, pp=1, ep=False, backend=DEFAULT_DISPATCH_BACKEND,
           placement=DEFAULT_PLACEMENT) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=tp, sequence_parallel_size=sp, cfg_parallel_size=cfg,
                          data_parallel_size=dp, pipeline_parallel_size=pp, enable_expert_parallel=ep,
                          all2all_backend=backend, expert_placement=placement)


def ep_modes(config: ParallelConfig) -> list[ParallelConfig]:
    """The layout with EP off, and with EP on over every registered backend."""
    return [config.replace(enable_expert_parallel=False)] + [
        config.replace(enable_expert_parallel=True, all2all_backend=b) for b in BACKENDS]


def factorizations(world: int) -> list[ParallelConfig]:
    """Every layout (tp, sp, cfg, dp) of `world` ranks with cfg in (1, 2), EP off."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    return [layout(tp, sp, cfg, dp) for tp, sp, cfg, dp in itertools.product(divisors, repeat=4)
            if cfg in (1, 2) and tp * sp * cfg * dp == world]
