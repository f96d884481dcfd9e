"""SwiGLU MLP in the release layout (fused gate_and_up_proj = [up; gate]), TP-sharded."""

from __future__ import annotations

from torch import nn

from ..distributed.parallel_state import Group
from ..moe.experts import swiglu_up_gate
from .linear import ColumnParallelLinear, RowParallelLinear


class SwiGLUMLP(nn.Module):
    """Column-parallel gate_and_up, row-parallel down. With reduce=False the output is this TP
    rank's partial sum, left for a caller that all-reduces once for several terms (the MoE)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: Group, reduce: bool = True,
                 dtype=None, device=None):
        super().__init__()
        self.gate_and_up_proj = ColumnParallelLinear(hidden_size, 2 * intermediate_size, tp, parts=2,
                                                     dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, reduce=reduce,
                                           dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(swiglu_up_gate(self.gate_and_up_proj(x)))
