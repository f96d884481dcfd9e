"""Which rank holds which expert (docs/architecture.md, 'The MoE block'): a placement maps each
expert to the EP rank that holds it. `PLACEMENTS` is the registry of `--expert-placement` (plain
Python, so that the layout can be checked without loading torch)."""

from __future__ import annotations


def _linear(num_experts: int, num_shards: int) -> list[int]:
    return [e // (num_experts // num_shards) for e in range(num_experts)]  # contiguous blocks


def _round_robin(num_experts: int, num_shards: int) -> list[int]:
    return [e % num_shards for e in range(num_experts)]


PLACEMENTS = {"linear": _linear, "round_robin": _round_robin}
DEFAULT_PLACEMENT = "linear"


def expert_owners(num_experts: int, num_shards: int, placement: str = DEFAULT_PLACEMENT) -> list[int]:
    """owner[e] = the shard (EP rank) holding expert e."""
    if num_experts % num_shards:
        raise ValueError(f"{num_experts} experts cannot be split evenly over {num_shards} ranks")
    return PLACEMENTS[placement](num_experts, num_shards)


def local_experts(num_experts: int, num_shards: int, shard: int, placement: str = DEFAULT_PLACEMENT) -> list[int]:
    """Global ids of the experts on `shard`, in local order."""
    return [e for e, owner in enumerate(expert_owners(num_experts, num_shards, placement)) if owner == shard]
