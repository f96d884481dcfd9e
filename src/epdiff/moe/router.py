"""The replicated router: scores in fp32, top-k, weights (docs/architecture.md, 'The MoE block')."""

from __future__ import annotations

import torch
from torch import nn

SCORING_FUNCS = ("softmax", "sigmoid")


class Router(nn.Module):
    """gate [E, D], identical on every rank, so every rank routes its own tokens locally.

    Scores: softmax over all E experts (HunyuanImage-3.0) or a sigmoid per expert. With
    `num_groups` > 1 the experts form equal consecutive groups, a group scores its best expert,
    and a token picks its top-k only among the experts of its `topk_groups` best groups (the
    other scores count as 0; DeepSeek-V2's group-limited greedy). Weights of the k picks:
    rescaled to sum 1 when `renormalize`, then multiplied by `scaling_factor`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, scoring: str = "softmax",
                 renormalize: bool = True, scaling_factor: float = 1.0, num_groups: int = 1, topk_groups: int = 1):
        super().__init__()
        if scoring not in SCORING_FUNCS:
            raise ValueError(f"unknown router scoring {scoring!r}; choose one of {SCORING_FUNCS}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"{num_experts} experts cannot be split into {num_groups} routing groups")
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be in [1, {num_groups}], got {topk_groups}")
        if top_k > topk_groups * (num_experts // num_groups):
            raise ValueError(f"top_k {top_k} exceeds the {topk_groups * (num_experts // num_groups)} experts "
                             f"of {topk_groups} routing groups")
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize, self.scaling_factor = scoring, renormalize, float(scaling_factor)
        self.num_groups, self.topk_groups = num_groups, topk_groups
        # fp32 like the reference's gate, whatever dtype the rest of the model has.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        logits = x.float() @ self.weight.float().t()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.num_groups > 1:
            scores = self._limit_to_best_groups(scores)
        weights, ids = torch.topk(scores, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        if self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        return ids, weights

    def _limit_to_best_groups(self, scores: torch.Tensor) -> torch.Tensor:
        grouped = scores.view(scores.shape[0], self.num_groups, -1)
        best = grouped.amax(dim=-1).topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=scores.device).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], 0.0).view_as(scores)
