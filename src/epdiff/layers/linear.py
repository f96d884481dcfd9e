"""Tensor-parallel linear layers and the slicing that loads them.

A weight is loaded from a `source`: a torch tensor or a safetensors slice (both index the
same way), so a rank reads only its rows or columns from disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.collectives import all_reduce
from ..distributed.parallel_state import Group


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


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows of this TP rank].T; the output stays sharded.

    With an FP8 quant_config the weight is float8 with one scale per output row (weight_scale),
    quantized as it is loaded, and x is quantized per row: a TP rank holds whole rows of W and
    the whole x, so every layout computes the same numbers (quantization/__init__.py)."""

    def __init__(self, in_features: int, out_features: int, tp: Group, bias: bool = False,
                 parts: int = 1, dtype=None, device=None, quant_config=None):
        super().__init__()
        self.tp, self.parts = tp, parts
        if out_features % (parts * tp.size):
            raise ValueError(f"output size {out_features} cannot be split into {parts} parts × TP {tp.size}")
        local = out_features // tp.size
        self.fp8 = quant_config is not None
        self.dtype = dtype
        if self.fp8:
            from ..quantization.fp8 import FP8_DTYPE

            self.weight = nn.Parameter(torch.empty(local, in_features, dtype=FP8_DTYPE, device=device),
                                       requires_grad=False)
            self.weight_scale = nn.Parameter(torch.empty(local, dtype=torch.float32, device=device),
                                             requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(local, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        if self.fp8:
            from ..quantization import fp8

            y = fp8.linear(x, self.weight, self.weight_scale, x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def load_weight(self, source, name: str = "weight"):
        self.set_weight(read_row_shard(source, self.tp.rank, self.tp.size, self.parts), name)

    def set_weight(self, value: torch.Tensor, name: str = "weight"):
        """This rank's rows, in high precision (quantized here for FP8)."""
        if not self.fp8:
            return copy_checked(self.weight, value, name)
        from ..quantization import fp8

        if value.dtype == fp8.FP8_DTYPE:
            raise ValueError(f"{name}: float8 weights without their weight_scale")
        q, scale = fp8.quantize_weight(value.to(self.weight.device))
        copy_checked(self.weight, q, name)
        copy_checked(self.weight_scale, scale, name + "_scale")


class RowParallelLinear(nn.Module):
    """x sharded on its last dim; y = all-reduce(x_local @ W[:, cols].T) unless reduce=False."""

    def __init__(self, in_features: int, out_features: int, tp: Group, reduce: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.tp, self.reduce = tp, reduce
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} cannot be split over TP {tp.size}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size, dtype=dtype, device=device))

    def forward(self, x):
        y = F.linear(x, self.weight)
        return all_reduce(y, self.tp) if self.reduce else y

    def load_weight(self, source, name: str = "weight"):
        copy_checked(self.weight, read_col_shard(source, self.tp.rank, self.tp.size), name)
