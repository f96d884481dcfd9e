"""SwiGLU on a fused [up; gate] projection (the layout of every fused up/gate weight here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import moe as moe_kernels


def swiglu_up_gate(fused: torch.Tensor) -> torch.Tensor:
    """[.., 2I] laid out [up; gate] -> up * silu(gate) (the activation is on the second half)."""
    if kernels.available(fused):
        return moe_kernels.swiglu(fused.reshape(-1, fused.shape[-1])).view(*fused.shape[:-1], fused.shape[-1] // 2)
    up, gate = fused.chunk(2, dim=-1)
    return up * F.silu(gate)
