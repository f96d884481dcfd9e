"""Which rank holds which expert (docs/architecture.md, 'The MoE block':
expert_map[e] = local index or -1)."""

from __future__ import annotations

import torch


def expert_owners(num_experts: int, num_shards: int, placement: str = "linear") -> torch.Tensor:
    """owner[e] = the shard (EP rank) holding expert e."""
    if num_experts % num_shards:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_shards} ranks")
    e = torch.arange(num_experts)
    if placement == "linear":
        return e // (num_experts // num_shards)
    if placement == "round_robin":
        return e % num_shards
    raise ValueError(f"unknown expert placement {placement!r}")


def local_experts(num_experts: int, num_shards: int, shard: int, placement: str = "linear") -> list[int]:
    """Global ids of the experts on `shard`, in local order."""
    owners = expert_owners(num_experts, num_shards, placement)
    return torch.nonzero(owners == shard).flatten().tolist()


def expert_map(num_experts: int, num_shards: int, shard: int, placement: str = "linear") -> torch.Tensor:
    """map[e] = local index of expert e on `shard`, or -1 when another shard holds it."""
    out = torch.full((num_experts,), -1, dtype=torch.int64)
    ids = local_experts(num_experts, num_shards, shard, placement)
    out[ids] = torch.arange(len(ids))
    return out
