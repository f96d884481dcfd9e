"""SwiGLU MLP with a fused [up; gate] input projection (the order HunyuanImage-3.0 stores), TP-sharded.

Module names are generic; a model's weight loading maps its checkpoint names onto them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..distributed.parallel_state import Group
from ..kernels import moe as moe_kernels
from .linear import ColumnParallelLinear, RowParallelLinear


def swiglu_up_gate(fused: torch.Tensor) -> torch.Tensor:
    """[.., 2I] laid out [up; gate] -> up * silu(gate) (the activation is on the second half)."""
    if kernels.available(fused):
        return moe_kernels.swiglu(fused.reshape(-1, fused.shape[-1])).view(*fused.shape[:-1], fused.shape[-1] // 2)
    up, gate = fused.chunk(2, dim=-1)
    return up * F.silu(gate)


class SwiGLUMLP(nn.Module):
    """Column-parallel fused up_gate_proj ([up; gate]), row-parallel down_proj. With reduce=False
    the output is this TP rank's partial sum, left for a caller that all-reduces once for several
    terms (the MoE)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: Group, reduce: bool = True,
                 dtype=None, device=None, quant_config=None):
        """quant_config: an FP8 config makes up_gate_proj FP8 (down_proj, row-parallel, stays in dtype)."""
        super().__init__()
        self.up_gate_proj = ColumnParallelLinear(hidden_size, 2 * intermediate_size, tp, parts=2,
                                                 dtype=dtype, device=device, quant_config=quant_config)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp, reduce=reduce,
                                           dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(swiglu_up_gate(self.up_gate_proj(x)))
