"""This rank's experts and their grouped compute (docs/architecture.md, 'The MoE block').

w13[e] is expert e's fused input projection [2I, D], the *up* half first and the gate half
second (HunyuanImage-3.0's order); w2[e] is its down projection [D, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.mlp import swiglu_up_gate
from .. import kernels
from ..kernels import moe as moe_kernels

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
        R, k = local_ids.shape
        flat = local_ids.flatten()
        # Sort the (token, slot) pairs by local expert; pairs for other ranks sort last.
        key = torch.where(flat >= 0, flat, self.num_local_experts)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(self.num_local_experts + 1, dtype=torch.int64, device=x.device)
        counts = counts.index_add_(0, key, torch.ones_like(key))[:-1]
        if R == 0:
            return x.new_zeros(0, x.shape[1]), counts
        if self._use_grouped_mm(x):
            return self._forward_grouped(x, order, weights.flatten()[order], counts, k), counts
        return self._forward_loop(x, order, weights.flatten()[order], counts, k), counts

    def _forward_grouped(self, x, order, w, counts, k):
        """No host sync: how many pairs are local is known only on the device, so the buffers
        hold every pair. The grouped GEMMs stop at the last expert's offset and the Triton
        kernels at the local count: the rows past it cost memory, not work."""
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        num_pairs = offs[-1:]
        rows = order // k
        row_index = torch.arange(order.numel(), device=x.device)
        is_local = row_index < num_pairs
        w13, w2 = self.w13.transpose(-2, -1), self.w2.transpose(-2, -1)
        if kernels.available(x):
            h = moe_kernels.gather_rows(x, rows, num_pairs)
            out = _grouped_mm(moe_kernels.swiglu(_grouped_mm(h, w13, offs), w, num_pairs), w2, offs)
            slot_to_row = torch.empty_like(order)
            slot_to_row[order] = torch.where(is_local, row_index, -1)
            return moe_kernels.combine(out, slot_to_row, x.shape[0], k)
        out = _grouped_mm(self._weighted_activation(_grouped_mm(x[rows], w13, offs), w), w2, offs)
        # Rows past the local pairs were never written: select (not multiply) them away.
        return self._sum_slots(torch.where(is_local[:, None], out, 0), order, x.shape[0], k)

    def _forward_loop(self, x, order, w, counts, k):
        """Per-expert matmuls, sized on the host (free on CPU; one sync on a GPU)."""
        sizes = counts.tolist()
        order, w = order[:sum(sizes)], w[:sum(sizes)]
        h = x[order // k]
        outs = [self._weighted_activation(part @ self.w13[e].t(), part_w) @ self.w2[e].t()
                for e, (part, part_w) in enumerate(zip(torch.split(h, sizes), torch.split(w, sizes)))]
        return self._sum_slots(torch.cat(outs), order, x.shape[0], k)

    @staticmethod
    def _weighted_activation(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # down_proj is linear, so the routing weight can scale its (narrower) input instead of its output.
        return (swiglu_up_gate(fused).float() * w[:, None]).to(fused.dtype)

    @staticmethod
    def _sum_slots(out: torch.Tensor, order: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
        """Combine without atomics: put each pair's output back at its (token, slot) place, then
        sum the k slots of every token (slots computed on other ranks stay zero)."""
        per_slot = out.new_zeros(num_tokens * k, out.shape[1])
        per_slot[order[:out.shape[0]]] = out
        return per_slot.view(num_tokens, k, out.shape[1]).sum(1)
