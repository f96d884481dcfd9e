"""RMSNorm as HunyuanImage-3.0 computes it: statistics in fp32, cast back, then the weight."""

import torch
from torch import nn

from .. import kernels
from ..kernels import norm as norm_kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x); with a residual, (RMSNorm(x + residual), x + residual) (one pass on GPU)."""
        if kernels.available(x):
            return norm_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._eager(x)
        x = x + residual
        return self._eager(x), x

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
