"""Ulysses sequence parallelism: trade a sequence split for a head split with one all-to-all.

Rank r of the SP group holds sequence chunk r. `scatter_heads` gives every rank the whole
sequence for its 1/SP of the heads; `gather_heads` is the inverse.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import all_gather_tensor
from .parallel_state import Group


def _all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()  # the collective reads and writes raw memory: no permuted strides
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group.process_group)
    return out


def scatter_heads(x: torch.Tensor, sp: Group) -> torch.Tensor:
    """[B, S/SP, H, D] (sequence chunk) -> [B, S, H/SP, D] (head chunk)."""
    if sp.size == 1:
        return x
    B, s, H, D = x.shape
    chunks = x.view(B, s, sp.size, H // sp.size, D).permute(2, 0, 1, 3, 4)  # [SP, B, s, H/SP, D]
    received = _all_to_all(chunks, sp)  # [SP (sequence chunk), B, s, H/SP, D]
    return received.permute(1, 0, 2, 3, 4).reshape(B, sp.size * s, H // sp.size, D)


def gather_heads(x: torch.Tensor, sp: Group) -> torch.Tensor:
    """[B, S, H/SP, D] (head chunk) -> [B, S/SP, H, D] (sequence chunk)."""
    if sp.size == 1:
        return x
    B, S, h, D = x.shape
    s = S // sp.size
    chunks = x.view(B, sp.size, s, h, D).permute(1, 0, 2, 3, 4)  # [SP (sequence chunk), B, s, h, D]
    received = _all_to_all(chunks, sp)  # [SP (head chunk), B, s, h, D]
    return received.permute(1, 2, 0, 3, 4).reshape(B, s, sp.size * h, D)


def local_chunk(x: torch.Tensor, sp: Group, dim: int) -> torch.Tensor:
    """This rank's chunk of x along dim (no communication)."""
    if sp.size == 1:
        return x
    size = x.shape[dim]
    if size % sp.size:
        raise ValueError(f"{size} tokens cannot be split evenly over sequence parallel size {sp.size}")
    return x.narrow(dim, sp.rank * (size // sp.size), size // sp.size)


def gather_sequence(x: torch.Tensor, sp: Group, dim: int) -> torch.Tensor:
    """Inverse of local_chunk: every rank's chunk concatenated along dim."""
    if sp.size == 1:
        return x
    parts = all_gather_tensor(x, sp)  # [SP, ...]
    return torch.cat(parts.unbind(0), dim=dim)
