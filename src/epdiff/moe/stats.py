"""Routing statistics: how many (token, expert) pairs each expert and each EP rank computed.

Counting happens on the device inside every MoE forward (no sync); `collect_routing_stats`
sums the counts over the ranks once, when a user asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed.collectives import all_reduce


@dataclass
class RoutingStats:
    tokens_per_expert: torch.Tensor  # [L, E] int64, summed over every rank that holds distinct tokens
    owner: torch.Tensor  # [E] EP rank holding each expert (all 0 when EP is off)
    num_ranks: int  # EP size (1 when EP is off)

    @property
    def tokens_per_rank(self) -> torch.Tensor:  # [L, EP]
        out = torch.zeros(self.tokens_per_expert.shape[0], self.num_ranks, dtype=torch.int64)
        return out.index_add_(1, self.owner, self.tokens_per_expert)

    @staticmethod
    def _imbalance(load: torch.Tensor) -> torch.Tensor:
        mean = load.float().mean(-1)
        return torch.where(mean > 0, load.float().amax(-1) / mean.clamp_min(1e-9), torch.ones_like(mean))

    @property
    def expert_imbalance(self) -> torch.Tensor:
        """Per layer: busiest expert ÷ mean expert load (1.0 = perfectly even)."""
        return self._imbalance(self.tokens_per_expert)

    @property
    def rank_imbalance(self) -> torch.Tensor:
        return self._imbalance(self.tokens_per_rank)

    @property
    def idle_experts(self) -> torch.Tensor:
        """Per layer: experts that received no token at all."""
        return (self.tokens_per_expert == 0).sum(-1)

    def summary(self) -> str:
        lines = ["layer  pairs      expert max/mean  rank max/mean  idle experts  tokens per rank"]
        for i in range(self.tokens_per_expert.shape[0]):
            lines.append(f"{i:5d}  {int(self.tokens_per_expert[i].sum()):9d}  "
                         f"{float(self.expert_imbalance[i]):15.2f}  {float(self.rank_imbalance[i]):13.2f}  "
                         f"{int(self.idle_experts[i]):12d}  {self.tokens_per_rank[i].tolist()}")
        return "\n".join(lines)


def collect_routing_stats(moe_layers, parallel) -> RoutingStats:
    """Collective over the EP group (EP on) or the token group (EP off): call on every rank."""
    if not moe_layers:
        raise ValueError("no MoE layers to collect routing statistics from")
    load = torch.stack([layer.expert_load for layer in moe_layers]).clone()
    ep = parallel.config.enable_expert_parallel
    # EP on: each pair is computed on exactly one rank of the EP group. EP off: TP ranks compute
    # width slices of the same pairs, so only the token group's counts are distinct.
    all_reduce(load, parallel.ep if ep else parallel.token)
    placement = moe_layers[0].placement
    return RoutingStats(load.cpu(), placement.owner.cpu(), parallel.ep.size if ep else 1)
