"""The replicated router: scores in fp32, top-k, optional renormalisation (DESIGN §3)."""

from __future__ import annotations

import torch
from torch import nn

SCORING_FUNCS = ("softmax", "sigmoid")


class Router(nn.Module):
    """gate [E, D], identical on every rank, so every rank routes its own tokens locally.

    softmax: over all E experts, then top-k (HunyuanImage-3.0). sigmoid: per-expert scores,
    then top-k. `renormalize` rescales the k weights to sum to 1.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True):
        super().__init__()
        if scoring not in SCORING_FUNCS:
            raise ValueError(f"unknown router scoring {scoring!r}; choose one of {SCORING_FUNCS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize = scoring, renormalize
        # fp32 like the reference's gate, whatever dtype the rest of the model has.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        logits = x.float() @ self.weight.float().t()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        return ids, weights
