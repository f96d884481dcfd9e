"""Which rank holds which expert (docs/architecture.md, 'The MoE block'): a placement maps each
expert to the EP rank that holds it. `PLACEMENTS` is the registry of `--expert-placement`."""

from __future__ import annotations

import torch


def _linear(num_experts: int, num_shards: int) -> torch.Tensor:
    return torch.arange(num_experts) // (num_experts // num_shards)  # contiguous blocks


def _round_robin(num_experts: int, num_shards: int) -> torch.Tensor:
    return torch.arange(num_experts) % num_shards


PLACEMENTS = {"linear": _linear, "round_robin": _round_robin}
DEFAULT_PLACEMENT = "linear"


def expert_owners(num_experts: int, num_shards: int, placement: str = DEFAULT_PLACEMENT) -> torch.Tensor:
    """owner[e] = the shard (EP rank) holding expert e."""
    if num_experts % num_shards:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_shards} ranks")
    return PLACEMENTS[placement](num_experts, num_shards)


def local_experts(num_experts: int, num_shards: int, shard: int, placement: str = DEFAULT_PLACEMENT) -> list[int]:
    """Global ids of the experts on `shard`, in local order."""
    owners = expert_owners(num_experts, num_shards, placement)
    return torch.nonzero(owners == shard).flatten().tolist()
