"""Tensor-parallel linear layers. Each holds a `quant_method` (quantization/base.py) that creates
its weight, loads it and applies it; the layer itself only knows how it is sharded."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed.collectives import all_reduce
from ..distributed.parallel_state import Group
from ..loader.slicing import read_col_shard, read_row_shard
from ..quantization import QuantizationConfig, linear_method


class ColumnParallelLinear(nn.Module):
    """y_local = x @ W[rows of this TP rank].T; the output stays sharded. A rank holds whole rows
    of W and the whole x, so a quantized weight (per-row scales) is the same on every layout."""

    def __init__(self, in_features: int, out_features: int, tp: Group, bias: bool = False,
                 parts: int = 1, dtype=None, device=None, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.tp, self.parts, self.dtype = tp, parts, dtype
        if out_features % (parts * tp.size):
            raise ValueError(f"output size {out_features} cannot be split into {parts} parts × TP {tp.size}")
        self.quant_method = linear_method(quant_config, row_parallel=False)
        self.quant_method.create_weights(self, out_features // tp.size, in_features, dtype, device)
        self.bias = nn.Parameter(torch.empty(out_features // tp.size, dtype=dtype, device=device)) if bias else None

    @property
    def full_shape(self) -> tuple[int, int]:
        """The unsharded weight's shape, as a checkpoint stores it."""
        return self.weight.shape[0] * self.tp.size, self.weight.shape[1]

    def forward(self, x):
        return self.quant_method.apply(self, x, self.bias)

    def load_weight(self, source, name: str = "weight"):
        self.set_weight(read_row_shard(source, self.tp.rank, self.tp.size, self.parts), name)

    def set_weight(self, value, name: str = "weight"):
        """This rank's rows, in high precision."""
        self.quant_method.load_weight(self, value, name)


class RowParallelLinear(nn.Module):
    """x sharded on its last dim; y = all-reduce(x_local @ W[:, cols].T) unless reduce=False."""

    def __init__(self, in_features: int, out_features: int, tp: Group, reduce: bool = True,
                 dtype=None, device=None, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.tp, self.reduce, self.dtype = tp, reduce, dtype
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} cannot be split over TP {tp.size}")
        self.quant_method = linear_method(quant_config, row_parallel=True)
        self.quant_method.create_weights(self, out_features, in_features // tp.size, dtype, device)

    @property
    def full_shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1] * self.tp.size

    def forward(self, x):
        y = self.quant_method.apply(self, x)
        return all_reduce(y, self.tp) if self.reduce else y

    def load_weight(self, source, name: str = "weight"):
        self.set_weight(read_col_shard(source, self.tp.rank, self.tp.size), name)

    def set_weight(self, value, name: str = "weight"):
        """This rank's columns, in high precision."""
        self.quant_method.load_weight(self, value, name)

