"""This rank's experts and their grouped compute (DESIGN §3, "Expert compute").

Weights keep the release layout: w13[e] is expert e's fused `gate_and_up_proj` [2I, D] with the
*up* half first and the gate half second; w2[e] is its `down_proj` [D, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.mlp import swiglu_up_gate
from . import kernels

EXPERT_KERNELS = ("auto", "grouped_mm", "loop")


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Where torch's grouped GEMM has a fast kernel: Hopper or newer, bf16."""
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.float32, device=None, kernel: str = "auto"):
        super().__init__()
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"unknown expert kernel {kernel!r}; choose one of {EXPERT_KERNELS}")
        self.num_local_experts = num_local_experts
        self.kernel = kernel
        self.w13 = nn.Parameter(torch.empty(num_local_experts, 2 * intermediate_size, hidden_size,
                                            dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, hidden_size, intermediate_size,
                                           dtype=dtype, device=device))

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.kernel == "auto":
            return grouped_mm_supported(x.device, x.dtype)
        return self.kernel == "grouped_mm"

    def forward(self, x: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, D]; local_ids [R, k] (local expert index, -1 = not here); weights [R, k].

        Returns (y [R, D] = Σ_j weights[r, j]·expert_{local_ids[r, j]}(x[r]) over local j,
        tokens per local expert [E_local]).
        """
        k = local_ids.shape[1]
        flat = local_ids.flatten()
        here = flat >= 0
        # Sort pairs by local expert; pairs for other ranks sort last and are cut off.
        order = torch.argsort(torch.where(here, flat, self.num_local_experts), stable=True)
        num_pairs = int(here.sum())  # the one host sync: it sizes the expert buffers
        order = order[:num_pairs]
        rows, expert = order // k, flat[order]
        counts = torch.zeros(self.num_local_experts, dtype=torch.int64, device=x.device)
        counts.index_add_(0, expert, torch.ones_like(expert))
        # Combine without atomics: put each pair's weighted output back at its (token, slot)
        # place, then sum the k slots of every token (pairs for other ranks stay zero).
        out = x.new_zeros(0, x.shape[1])
        if num_pairs:
            h, w = x[rows], weights.flatten()[order, None]
            kernel = self._forward_grouped if self._use_grouped_mm(h) else self._forward_loop
            out = kernel(h, w, counts)
        if kernels.available(x):
            slot_to_row = torch.full((x.shape[0] * k,), -1, dtype=torch.int64, device=x.device)
            slot_to_row[order] = torch.arange(num_pairs, device=x.device)
            return kernels.combine(out, slot_to_row, x.shape[0], k), counts
        per_slot = x.new_zeros(x.shape[0] * k, x.shape[1])
        per_slot[order] = out
        return per_slot.view(x.shape[0], k, x.shape[1]).sum(1), counts

    @staticmethod
    def _weighted_activation(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # down_proj is linear, so the routing weight can scale its (narrower) input instead of its output.
        if kernels.available(fused):
            return kernels.swiglu_weight(fused, w.flatten())
        return (swiglu_up_gate(fused).float() * w).to(fused.dtype)

    def _forward_grouped(self, h, w, counts):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        a = self._weighted_activation(_grouped_mm(h, self.w13.transpose(-2, -1), offs), w)
        return _grouped_mm(a, self.w2.transpose(-2, -1), offs)

    def _forward_loop(self, h, w, counts):
        outs = []
        for e, (part, part_w) in enumerate(zip(torch.split(h, counts.tolist()), torch.split(w, counts.tolist()))):
            if part.shape[0]:
                outs.append(self._weighted_activation(part @ self.w13[e].t(), part_w) @ self.w2[e].t())
        return torch.cat(outs)
