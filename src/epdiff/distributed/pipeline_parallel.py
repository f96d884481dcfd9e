"""Pipeline parallelism: contiguous layer ranges per stage and the hand-off between stages."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import even_chunk
from .parallel_state import Group


def stage_layers(num_layers: int, stages: int, stage: int) -> range:
    """Layers of `stage`: contiguous, sizes differing by at most one (earlier stages larger)."""
    if stages > num_layers:
        raise ValueError(f"pipeline_parallel_size {stages} > number of layers {num_layers}")
    return range(*even_chunk(num_layers, stage, stages))


class StageLink:
    """Activations from stage s to stage s+1 of the same (dp, cfg, sp, tp) position."""

    def __init__(self, pp: Group):
        self.pp = pp

    @property
    def is_first(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def recv(self, shape, dtype, device) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.pp.ranks[self.pp.rank - 1], group=self.pp.process_group)
        return x

    def send(self, x: torch.Tensor):
        dist.send(x.contiguous(), dst=self.pp.ranks[self.pp.rank + 1], group=self.pp.process_group)

    def broadcast_from_last(self, x: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
        """The last stage's tensor on every stage."""
        if self.pp.size == 1:
            return x
        # Contiguous on every stage: a conv output may be channels-last, and the bytes travel as they lie.
        x = x.contiguous() if self.is_last else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(x, src=self.pp.ranks[-1], group=self.pp.process_group)
        return x
