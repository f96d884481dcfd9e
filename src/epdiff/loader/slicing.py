"""Reading a rank's part of a weight from a `source`: a torch tensor or a safetensors slice (both
index the same way), so that a rank reads only its rows or columns from disk."""

from __future__ import annotations

import torch


def source_shape(source) -> tuple[int, ...]:
    return tuple(source.get_shape()) if hasattr(source, "get_shape") else tuple(source.shape)


def shard_range(size: int, rank: int, shards: int) -> tuple[int, int]:
    if size % shards:
        raise ValueError(f"dimension {size} cannot be split evenly into {shards} shards")
    step = size // shards
    return rank * step, (rank + 1) * step


def read_row_shard(source, rank: int, shards: int, parts: int = 1) -> torch.Tensor:
    """Rows of shard `rank` of each of `parts` equal row blocks, concatenated.

    parts=2 shards a fused [up; gate] weight into [up_rank; gate_rank].
    """
    rows = source_shape(source)[0]
    part = rows // parts
    out = []
    for p in range(parts):
        lo, hi = shard_range(part, rank, shards)
        out.append(source[p * part + lo: p * part + hi])
    return out[0] if parts == 1 else torch.cat(out)


def read_col_shard(source, rank: int, shards: int) -> torch.Tensor:
    lo, hi = shard_range(source_shape(source)[1], rank, shards)
    return source[:, lo:hi]


def copy_checked(param: torch.Tensor, value: torch.Tensor, name: str = "weight"):
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)
