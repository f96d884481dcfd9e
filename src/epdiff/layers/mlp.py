"""SwiGLU MLP with a fused [up; gate] input projection, TP-sharded.

Module names are generic; a model's weight loading maps its checkpoint names onto them."""

from __future__ import annotations

from torch import nn

from ..distributed.parallel_state import Group
from .activation import swiglu_up_gate
from .linear import ColumnParallelLinear, RowParallelLinear


class SwiGLUMLP(nn.Module):
    """Column-parallel fused up_gate_proj ([up; gate]), row-parallel down_proj. With reduce=False
    the output is this TP rank's partial sum, left for a caller that all-reduces once for several
    terms (the MoE)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: Group, reduce: bool = True,
                 dtype=None, device=None, quant_config=None):
        super().__init__()
        self.up_gate_proj = ColumnParallelLinear(hidden_size, 2 * intermediate_size, tp, parts=2,
                                                 dtype=dtype, device=device, quant_config=quant_config)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, reduce=reduce,
                                           dtype=dtype, device=device, quant_config=quant_config)

    def forward(self, x):
        return self.down_proj(swiglu_up_gate(self.up_gate_proj(x)))
