"""The replicated router: scores in fp32, top-k, weights (docs/architecture.md, 'The MoE block')."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed.sequence_parallel import gather_sequence

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
        """x [..., D] (T tokens) -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        logits = x.reshape(-1, x.shape[-1]).float() @ self.weight.float().t()
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


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Nucleus-Image's routing; docs/architecture.md, 'The MoE block'): each expert
    takes the top-C tokens of each image by affinity, C = max(1, ceil(capacity_factor · S / E)) for
    an image of S tokens; a token's gates are divided by their sum over the experts that chose it,
    then multiplied by `route_scale`. Every expert thus computes exactly C rows per image.

    The selection needs every score of an image: under sequence parallelism each rank holds S/SP
    tokens of it, so the scores [B, E, S/SP] are gathered over the SP group (not the hidden
    states), every SP rank selects the same, and keeps the picks of its own tokens. DP and CFG
    ranks hold whole images already.

    `forward` returns the token-centric form the dispatchers take: for each of this rank's tokens,
    one slot per expert: ids [T, E] (the expert, or -1 where it did not pick the token) and weights
    [T, E]. `expert_major` returns each expert's B·C rows, for a rank that runs its experts on its
    own whole images (no token movement, no SP): exactly the pairs, static shapes.
    Scores are computed in `dtype`, the softmax or sigmoid in fp32 and cast back (as the reference).
    """

    def __init__(self, input_size: int, num_experts: int, capacity_factor: float, sp, scoring: str = "softmax",
                 route_scale: float = 1.0, dtype=torch.float32):
        super().__init__()
        if scoring not in SCORING_FUNCS:
            raise ValueError(f"unknown router scoring {scoring!r}; choose one of {SCORING_FUNCS}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.num_experts, self.top_k = num_experts, num_experts  # a slot per expert
        self.capacity_factor, self.route_scale, self.scoring, self.sp = capacity_factor, float(route_scale), scoring, sp
        self.weight = nn.Parameter(torch.empty(num_experts, input_size, dtype=dtype))

    def capacity(self, tokens_per_image: int) -> int:
        return min(tokens_per_image, max(1, math.ceil(self.capacity_factor * tokens_per_image / self.num_experts)))

    def _logits(self, x) -> torch.Tensor:
        """x [B, S_local, R], or (the features every token of an image shares [B, P], each token's own
        [B, S_local, R - P]): the shared part is scored once per image, not concatenated to every token."""
        shared, own = x if isinstance(x, tuple) else (None, x)
        if own.dim() != 3:
            raise ValueError(f"expert choice routes whole images: give [images, tokens, features], got {tuple(own.shape)}")
        w = self.weight
        if shared is None:
            return own.to(w.dtype) @ w.t()
        P = shared.shape[-1]
        return own.to(w.dtype) @ w[:, P:].t() + (shared.to(w.dtype) @ w[:, :P].t())[:, None]

    def _select(self, x) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x: as `_logits` takes it -> each expert's C tokens of each image [B, E, C] (positions in the
        whole image), their gates [B, E, C] (in the scores' dtype) and this rank's tokens per image."""
        logits = self._logits(x)
        B = logits.shape[0]
        scores = (logits.float().softmax(-1) if self.scoring == "softmax" else logits.float().sigmoid()).to(logits.dtype)
        affinity = gather_sequence(scores.transpose(1, 2).contiguous(), self.sp, dim=-1)  # [B, E, S]
        S = affinity.shape[-1]
        top = torch.topk(affinity, self.capacity(S), dim=-1)  # per image and expert: its C tokens
        picks = top.indices.flatten(1)  # [B, E·C]
        sums = torch.zeros(B, S, dtype=affinity.dtype, device=logits.device).scatter_add_(1, picks, top.values.flatten(1))
        gates = top.values / (sums.gather(1, picks).view_as(top.values) + 1e-12) * self.route_scale
        return top.indices, gates, logits.shape[1]

    def expert_major(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing as the experts see it, for a rank that holds whole images (no SP): x [B, S, R]
        -> (tokens [E, B·C]: each expert's rows as indices into the B·S tokens, gates [E, B·C] fp32)."""
        index, gates, S = self._select(x)
        B = index.shape[0]
        tokens = index + S * torch.arange(B, device=index.device)[:, None, None]
        return tokens.transpose(0, 1).reshape(self.num_experts, -1), gates.transpose(0, 1).reshape(
            self.num_experts, -1).float()

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S_local, R] (or as `_logits` takes it): this rank's tokens of B images (an SP rank's
        chunk of each)."""
        index, gates, s = self._select(x)
        B = index.shape[0]
        S = s * self.sp.size
        picked = torch.zeros(B, self.num_experts, S, dtype=gates.dtype, device=index.device).scatter_(-1, index, gates)
        chosen = torch.zeros_like(picked, dtype=torch.bool).scatter_(-1, index, True)  # [B, E, S]
        lo = self.sp.rank * s  # this rank's chunk of each image
        picked, chosen = picked[..., lo:lo + s].transpose(1, 2), chosen[..., lo:lo + s].transpose(1, 2)  # [B, s, E]
        experts = torch.arange(self.num_experts, device=index.device).expand_as(chosen)
        ids = torch.where(chosen, experts, -1).reshape(B * s, self.num_experts)
        return ids, torch.where(chosen, picked, 0.0).float().reshape(B * s, self.num_experts)
