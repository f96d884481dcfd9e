"""Parallel configuration: user flags -> one validated description of the rank layout.

Everything here is checked before any process group, worker or weight exists, so a bad
layout costs nothing but an error message.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .moe.backends import DEFAULT_DISPATCH_BACKEND, DISPATCH_BACKENDS
from .moe.expert_map import DEFAULT_PLACEMENT, PLACEMENTS

# Mesh dimension order, outermost first. TP varies fastest (docs/architecture.md,
# 'Ranks and groups').
MESH_DIMS = ("pp", "dp", "cfg", "sp", "tp")


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the offending values."""


def is_int(value) -> bool:
    """An integer, and not a bool (JSON's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_json_object(path: str) -> dict:
    """A JSON file holding an object (a model folder's config files); ConfigError names the file."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def option(default, help: str, *, short: str | None = None, choices=None):
    """A config field that is also a command-line flag (`--field-name`, cli.add_dataclass_args) and
    a keyword of the Python API: its help, short flag and choices live here, once."""
    return field(default=default, metadata={"help": help, "short": short, "choices": choices})


def check_choices(config) -> None:
    """Every `option` field with choices holds one of them (or None, where None is its default)."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices and value not in choices and not (value is None and f.default is None):
            raise ConfigError(f"unknown {f.name} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = option(1, "shard attention heads and MLP widths over this many ranks", short="-tp")
    sequence_parallel_size: int = option(1, "split the image tokens over this many ranks (Ulysses)", short="-sp")
    cfg_parallel_size: int = option(1, "2: conditional and unconditional branches on different ranks")
    data_parallel_size: int = option(1, "different prompts on different ranks", short="-dp")
    pipeline_parallel_size: int = option(1, "split the layers into this many consecutive stages", short="-pp")
    enable_expert_parallel: bool = option(
        False, "spread the experts over all TP×SP×CFG×DP ranks of a stage (EP size is computed)")
    all2all_backend: str = option(DEFAULT_DISPATCH_BACKEND, "how tokens reach the ranks holding their experts",
                                  choices=tuple(DISPATCH_BACKENDS))
    expert_placement: str = option(DEFAULT_PLACEMENT, "linear: rank r holds a contiguous block of experts; "
                                                      "round_robin: expert e on EP rank e mod EP",
                                   choices=tuple(PLACEMENTS))

    def __post_init__(self):
        for name in ("tensor_parallel_size", "sequence_parallel_size", "cfg_parallel_size",
                     "data_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.cfg_parallel_size not in (1, 2):
            raise ConfigError(
                f"cfg_parallel_size must be 1 or 2 (one rank per guidance branch), got {self.cfg_parallel_size}")
        check_choices(self)

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
