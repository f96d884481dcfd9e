"""Parallel configuration: user flags -> one validated description of the rank layout.

Everything here is checked before any process group, worker or weight exists, so a bad
layout costs nothing but an error message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ALL2ALL_BACKENDS = ("allgather_reducescatter", "alltoall")
EXPERT_PLACEMENTS = ("linear", "round_robin")
# Mesh dimension order, outermost first. TP varies fastest (docs/architecture.md,
# 'Ranks and groups').
MESH_DIMS = ("pp", "dp", "cfg", "sp", "tp")


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the offending values."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    sequence_parallel_size: int = 1
    cfg_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    expert_placement: str = "linear"

    def __post_init__(self):
        for field in ("tensor_parallel_size", "sequence_parallel_size", "cfg_parallel_size",
                      "data_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.cfg_parallel_size not in (1, 2):
            raise ConfigError(
                f"cfg_parallel_size must be 1 or 2 (one rank per guidance branch), got {self.cfg_parallel_size}")
        if self.all2all_backend not in ALL2ALL_BACKENDS:
            raise ConfigError(
                f"unknown all2all_backend {self.all2all_backend!r}; choose one of {', '.join(ALL2ALL_BACKENDS)}")
        if self.expert_placement not in EXPERT_PLACEMENTS:
            raise ConfigError(
                f"unknown expert_placement {self.expert_placement!r}; choose one of {', '.join(EXPERT_PLACEMENTS)}")

    # Sizes in mesh order, so code that builds groups and code that prints them agree.
    @property
    def mesh_shape(self) -> tuple[int, ...]:
        return (self.pipeline_parallel_size, self.data_parallel_size, self.cfg_parallel_size,
                self.sequence_parallel_size, self.tensor_parallel_size)

    @property
    def world_size(self) -> int:
        return self.pipeline_parallel_size * self.ep_size

    @property
    def ep_size(self) -> int:
        """Ranks in one pipeline stage. With EP on, the experts are spread over all of them."""
        return (self.tensor_parallel_size * self.sequence_parallel_size * self.cfg_parallel_size
                * self.data_parallel_size)

    @property
    def token_group_size(self) -> int:
        """Ranks holding distinct tokens within one TP index (docs/architecture.md, 'Who holds
        which tokens')."""
        return self.sequence_parallel_size * self.cfg_parallel_size * self.data_parallel_size

    @property
    def expert_shards(self) -> int:
        """How many ways the experts are split: the EP size with EP on, else 1 (replicated)."""
        return self.ep_size if self.enable_expert_parallel else 1

    def describe(self) -> str:
        text = (f"TP={self.tensor_parallel_size} SP={self.sequence_parallel_size} "
                f"CFG={self.cfg_parallel_size} DP={self.data_parallel_size} "
                f"PP={self.pipeline_parallel_size}")
        if self.enable_expert_parallel:
            text += f" EP={self.ep_size} ({self.all2all_backend}, {self.expert_placement})"
        return text

    def replace(self, **changes) -> "ParallelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self, world_size: int | None = None, num_experts: int | None = None,
                 num_layers: int | None = None) -> "ParallelConfig":
        """Checks the layout against the world and the model. Returns self for chaining.

        num_experts=0 (or None with EP on) means the model has no experts.
        """
        if world_size is not None and world_size != self.world_size:
            raise ConfigError(
                f"world size {world_size} != PP×DP×CFG×SP×TP = {self.pipeline_parallel_size}×"
                f"{self.data_parallel_size}×{self.cfg_parallel_size}×{self.sequence_parallel_size}×"
                f"{self.tensor_parallel_size} = {self.world_size}")
        if num_layers is not None and self.pipeline_parallel_size > num_layers:
            raise ConfigError(
                f"pipeline_parallel_size {self.pipeline_parallel_size} > number of layers {num_layers}")
        if num_experts is None:
            return self
        if self.enable_expert_parallel and num_experts < 1:
            raise ConfigError("expert parallelism was asked for (--enable-expert-parallel), "
                              "but the model has no experts (num_experts=0)")
        if num_experts >= 1 and self.tensor_parallel_size > num_experts:
            raise ConfigError(
                f"tensor_parallel_size {self.tensor_parallel_size} > number of experts {num_experts}")
        if self.enable_expert_parallel and num_experts % self.ep_size != 0:
            raise ConfigError(
                f"{num_experts} experts cannot be split evenly over EP size {self.ep_size} "
                f"(= TP {self.tensor_parallel_size} × SP {self.sequence_parallel_size} × "
                f"CFG {self.cfg_parallel_size} × DP {self.data_parallel_size})")
        return self
