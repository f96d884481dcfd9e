"""Ranks laid out into parallel groups (docs/architecture.md, 'Ranks and groups' and
'Who holds which tokens').

rank = tp + TP·(sp + SP·(cfg + CFG·(dp + DP·pp))): the mesh is arange(world) reshaped to
(pp, dp, cfg, sp, tp). The EP group is the flattening of (dp, cfg, sp, tp), one per pipeline
stage; the token group is the flattening of (dp, cfg, sp), one per (stage, TP index); the replica
group is the flattening of (pp, cfg, sp, tp): every rank that works on one DP group's images; the
world group holds every rank of the layout (a decision all must share: the first-block cache's).

`rank_groups` computes the rank lists with no processes (for `epdiff layout`); `ParallelState`
builds the same groups with torch.distributed.device_mesh from the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import MESH_DIMS, ParallelConfig

# Groups a layer may ask for: the mesh dims plus the two flattened ones.
EP_DIMS = ("dp", "cfg", "sp", "tp")
TOKEN_DIMS = ("dp", "cfg", "sp")
REPLICA_DIMS = ("pp", "cfg", "sp", "tp")
GROUP_NAMES = MESH_DIMS + ("ep", "token", "replica", "world")


def rank_grid(config: ParallelConfig) -> torch.Tensor:
    return torch.arange(config.world_size).reshape(config.mesh_shape)


def _groups_along(grid: torch.Tensor, dims: tuple[str, ...]) -> list[list[int]]:
    """All rank lists that vary along `dims` (flattened in mesh order) with the others fixed."""
    keep = [MESH_DIMS.index(d) for d in dims]
    rest = [i for i in range(len(MESH_DIMS)) if i not in keep]
    size = 1
    for i in keep:
        size *= grid.shape[i]
    return grid.permute(*rest, *keep).reshape(-1, size).tolist()


def rank_groups(config: ParallelConfig) -> dict[str, list[list[int]]]:
    grid = rank_grid(config)
    groups = {dim: _groups_along(grid, (dim,)) for dim in MESH_DIMS}
    groups["ep"] = _groups_along(grid, EP_DIMS)
    groups["token"] = _groups_along(grid, TOKEN_DIMS)
    groups["replica"] = _groups_along(grid, REPLICA_DIMS)
    groups["world"] = _groups_along(grid, MESH_DIMS)
    return groups


@dataclass
class Group:
    """One process group as seen by this rank. `process_group` is None when size == 1."""

    name: str
    ranks: list[int]
    rank: int  # position of this process in `ranks`
    process_group: dist.ProcessGroup | None

    @property
    def size(self) -> int:
        return len(self.ranks)


class ParallelState:
    """The parallel groups of one rank, built once and handed to every parallel layer."""

    def __init__(self, config: ParallelConfig, groups: dict[str, Group], global_rank: int,
                 device: torch.device, mesh=None):
        self.config = config
        self.groups = groups
        self.global_rank = global_rank
        self.device = device
        self.mesh = mesh
        # What the layers of this rank share (the MoE layers: one exchange of token counts per forward).
        self.shared: dict[str, object] = {}

    def __getattr__(self, name):  # state.tp, state.ep, ...
        groups = self.__dict__.get("groups", {})
        if name in groups:
            return groups[name]
        raise AttributeError(name)

    @classmethod
    def single(cls, device: torch.device | str = "cpu", config: ParallelConfig | None = None):
        """One process, no process groups (every collective is the identity)."""
        config = config or ParallelConfig()
        if config.world_size != 1:
            raise ValueError(f"ParallelState.single needs a world of 1, got {config.describe()}")
        groups = {name: Group(name, [0], 0, None) for name in GROUP_NAMES}
        return cls(config, groups, 0, torch.device(device))

    @classmethod
    def build(cls, config: ParallelConfig, device: torch.device | str):
        """Builds the groups over the default process group; every rank must call this."""
        from torch.distributed.device_mesh import DeviceMesh

        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != config.world_size:  # the launcher starts config.world_size ranks; anything else is a bug
            raise ValueError(f"{world} ranks started for a layout of {config.world_size} ({config.describe()})")
        if world == 1:
            return cls.single(device, config)
        device = torch.device(device)
        mesh = DeviceMesh(device.type, rank_grid(config), mesh_dim_names=MESH_DIMS)
        ep_mesh = mesh[EP_DIMS]._flatten("ep")
        token_mesh = mesh[TOKEN_DIMS]._flatten("token")
        replica_mesh = mesh[REPLICA_DIMS]._flatten("replica")
        world_mesh = mesh._flatten("world")
        me = dist.get_rank()
        groups = {}
        flattened = [("ep", ep_mesh), ("token", token_mesh), ("replica", replica_mesh), ("world", world_mesh)]
        for name, sub in [(d, mesh[d]) for d in MESH_DIMS] + flattened:
            ranks = sub.mesh.flatten().tolist()
            groups[name] = Group(name, ranks, ranks.index(me),
                                 sub.get_group() if len(ranks) > 1 else None)
        return cls(config, groups, me, device, mesh)

    def describe(self) -> str:
        coords = " ".join(f"{n}={self.groups[n].rank}/{self.groups[n].size}" for n in GROUP_NAMES)
        return f"rank {self.global_rank}: {coords}"
