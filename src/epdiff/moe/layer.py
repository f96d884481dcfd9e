"""The expert-parallel MoE block (docs/architecture.md, 'The MoE block'):

    out(x) = shared_expert(x) + Σ_{e ∈ topk(x)} w_e(x) · expert_e(x)

Router replicated; experts split over the EP group (EP on) or each expert's width split over TP
(EP off); shared expert TP-sharded; one TP all-reduce sums the shared and routed partial sums.
Names here are generic: a model's weight loading maps its checkpoint names onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed.collectives import all_reduce
from ..distributed.parallel_state import ParallelState
from ..layers.linear import read_col_shard, read_row_shard
from ..layers.mlp import SwiGLUMLP
from .dispatch import Placement, make_dispatcher
from .expert_map import expert_owners
from .experts import GroupedExperts
from .router import Router


class MoELayer(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 parallel: ParallelState, shared_intermediate_size: int = 0, scoring: str = "softmax",
                 renormalize: bool = True, scaling_factor: float = 1.0, num_groups: int = 1, topk_groups: int = 1,
                 dtype=torch.float32, device=None, expert_kernel: str = "auto", quant_config=None):
        """Routing options are the Router's (see there). quant_config: an `Fp8Config` makes the
        routed experts FP8 (and the tokens travel to them in FP8) and the shared expert's
        up_gate_proj; None keeps them in dtype."""
        super().__init__()
        config = parallel.config
        config.validate(num_experts=num_experts)
        self.parallel = parallel
        self.num_experts = num_experts
        ep = config.enable_expert_parallel
        # EP on: whole experts over the EP group. EP off: every expert's width over TP.
        self.expert_tp = 1 if ep else parallel.tp.size
        shards, shard = (parallel.ep.size, parallel.ep.rank) if ep else (1, 0)
        if intermediate_size % self.expert_tp:
            raise ValueError(f"expert width {intermediate_size} cannot be split over TP {self.expert_tp}")
        self.placement = Placement(expert_owners(num_experts, shards, config.expert_placement), shard)
        self.placement.to(device or "cpu")
        self.gate = Router(hidden_size, num_experts, top_k, scoring, renormalize, scaling_factor, num_groups,
                           topk_groups)
        self.gate.to(device)
        self.shared_expert = (SwiGLUMLP(hidden_size, shared_intermediate_size, parallel.tp, reduce=False,
                                        dtype=dtype, device=device, quant_config=quant_config)
                              if shared_intermediate_size else None)
        self.experts = GroupedExperts(len(self.placement.global_ids), hidden_size,
                                      intermediate_size // self.expert_tp, dtype, device, expert_kernel,
                                      num_experts=num_experts, quant_config=quant_config)
        self.dispatch = make_dispatcher(parallel, fp8_tokens=quant_config is not None)
        # (token, expert) pairs this rank computed, per global expert, since the last reset.
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)

    @property
    def local_expert_ids(self) -> list[int]:
        return self.placement.global_ids.tolist()

    def forward(self, x: torch.Tensor, token_counts: list[int] | None = None) -> torch.Tensor:
        """x [..., D] -> [..., D]. token_counts: rows of every token-group rank, if the caller
        knows them (saves a host sync per layer)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.gate(x)
        pending = self.dispatch.start_dispatch(x, ids, weights, self.placement, token_counts)
        shared = self.shared_expert(x) if self.shared_expert is not None else None  # while the tokens travel
        rows, local_ids, row_weights, handle = pending.wait()
        y, load = self.experts(rows, local_ids, row_weights)
        out = self.dispatch.combine(y, handle)
        self.expert_load.index_add_(0, self.placement.global_ids, load)
        if shared is not None:
            out = out + shared
        return all_reduce(out, self.parallel.tp).reshape(shape)

    # -- weight loading ----------------------------------------------------------------------

    def owns_expert(self, expert: int) -> bool:
        return bool(self.placement.expert_map[expert] >= 0)

    def load_expert_weight(self, expert: int, kind: str, source, scale=None):
        """kind: 'w13' (fused [up; gate], [2I, D]) or 'w2' (down, [D, I]), unsharded in `source`
        (a tensor or a safetensors slice); `scale`: its per-output-channel weight scale where the
        source holds float8 codes. Call only for experts this rank owns."""
        local = int(self.placement.expert_map[expert])
        if local < 0:
            raise ValueError(f"expert {expert} is not held by this rank (holds {self.local_expert_ids})")
        t = self.parallel.tp
        shards, rank = (t.size, t.rank) if self.expert_tp > 1 else (1, 0)
        if kind == "w13":
            value = read_row_shard(source, rank, shards, parts=2)
            # One scale per output row: the rows' scales shard with them.
            scale = None if scale is None else read_row_shard(scale, rank, shards, parts=2)
        elif kind == "w2":
            value = read_col_shard(source, rank, shards)  # its output rows (and scales) are whole
            scale = None if scale is None else scale[:]
        else:
            raise ValueError(f"unknown expert weight {kind!r}; expected 'w13' or 'w2'")
        self.experts.load_expert(local, kind, value, scale, f"experts.{expert}.{kind}")

    def reset_routing_stats(self):
        self.expert_load.zero_()
