"""The expert-parallel MoE block (docs/architecture.md, 'The MoE block'):

    out(x) = shared_expert(x) + Σ_{e ∈ topk(x)} w_e(x) · expert_e(x)

Router replicated; experts split over the EP group (EP on) or each expert's width split over TP
(EP off); shared expert TP-sharded; one TP all-reduce sums the shared and routed partial sums.
Names here are generic: a model's weight loading maps its checkpoint names onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..distributed.collectives import all_reduce
from ..distributed.parallel_state import ParallelState
from ..layers.mlp import SwiGLUMLP
from ..kernels import moe as moe_kernels
from ..loader.slicing import read_col_shard, read_row_shard
from .dispatch import LocalDispatch, Placement, TokenCounts, make_dispatcher
from .expert_map import expert_owners
from .experts import GroupedExperts
from .router import Router


class MoELayer(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 parallel: ParallelState, shared_intermediate_size: int = 0, scoring: str = "softmax",
                 renormalize: bool = True, scaling_factor: float = 1.0, num_groups: int = 1, topk_groups: int = 1,
                 dtype=torch.float32, device=None, expert_kernel: str = "auto", quant_config=None,
                 router_input_size: int | None = None, router: nn.Module | None = None):
        """Routing options are the Router's (see there). quant_config: the quantization of the
        routed experts (which also picks the form tokens travel to them in) and of the shared
        expert's projections; None keeps them in dtype. router_input_size: the width of the router's
        own input, for a model whose router sees something besides the hidden states (default:
        hidden_size, the router sees them). router: a router of another kind (ExpertChoiceRouter),
        instead of the token-choice Router the routing options make. The layout is trusted (validated once,
        docs/architecture.md, 'Ranks and groups')."""
        super().__init__()
        config = parallel.config
        self.parallel = parallel
        self.num_experts = num_experts
        ep = config.enable_expert_parallel
        # EP on: whole experts over the EP group. EP off: every expert's width over TP.
        self.expert_tp = 1 if ep else parallel.tp.size
        shards, shard = (parallel.ep.size, parallel.ep.rank) if ep else (1, 0)
        if intermediate_size % self.expert_tp:
            raise ValueError(f"expert width {intermediate_size} cannot be split over TP {self.expert_tp}")
        self.placement = Placement(torch.tensor(expert_owners(num_experts, shards, config.expert_placement)), shard)
        self.placement.to(device or "cpu")
        self.gate = router if router is not None else Router(
            router_input_size or hidden_size, num_experts, top_k, scoring, renormalize, scaling_factor, num_groups,
            topk_groups)
        self.gate.to(device)
        self.shared_expert = (SwiGLUMLP(hidden_size, shared_intermediate_size, parallel.tp, reduce=False,
                                        dtype=dtype, device=device, quant_config=quant_config)
                              if shared_intermediate_size else None)
        self.experts = GroupedExperts(len(self.placement.global_ids), hidden_size,
                                      intermediate_size // self.expert_tp, dtype, device, expert_kernel,
                                      num_experts=num_experts, quant_config=quant_config)
        self.dispatch = make_dispatcher(parallel, self.experts.quant_method)
        # The experts' method prepares the tokens once (FP8: quantized per row) for the routed
        # experts and, where its projection takes that form, the shared expert.
        self.shared_takes_prepared = (self.shared_expert is not None
                                      and self.shared_expert.up_gate_proj.quant_method.takes_prepared_tokens)
        # An expert-choice router on a rank that keeps its tokens and holds whole images hands
        # the experts exactly their B·C rows each (the token-centric form has E slots a token).
        self.expert_major = (hasattr(self.gate, "expert_major") and isinstance(self.dispatch, LocalDispatch)
                             and parallel.sp.size == 1)
        self.token_counts = None
        if self.dispatch.needs_token_counts:
            # Every MoE layer of a forward has the same rows: one exchange serves them all.
            self.token_counts = parallel.shared.setdefault("moe_token_counts", TokenCounts(parallel.token))
            self.token_counts.reset()  # a layer built anew starts a new token layout
        self._pending_halves: dict[int, dict] = {}  # up_proj / gate_proj loaded apart, waiting for the other
        # (token, expert) pairs this rank computed, per global expert, since the last reset.
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64, device=device),
                             persistent=False)

    @property
    def local_expert_ids(self) -> list[int]:
        return self.placement.global_ids.tolist()

    def forward(self, x: torch.Tensor, router_input=None) -> torch.Tensor:
        """x [..., D] -> [..., D] ([images, tokens, D] for a router that routes whole images).
        router_input [..., R]: what the router scores, one row per row of x, where the model routes
        on something else than x itself (or that in a form the router takes: ExpertChoiceRouter's
        per-image and per-token parts)."""
        if self.expert_major:
            return self._forward_expert_major(x, x if router_input is None else router_input)
        shape = x.shape
        ids, weights = self.gate(x if router_input is None else router_input)
        x = x.reshape(-1, shape[-1])
        tokens = self.experts.quant_method.prepare_tokens(x)
        token_counts = None if self.token_counts is None else self.token_counts.get(x.shape[0], x.device)
        pending = self.dispatch.start_dispatch(tokens, ids, weights, self.placement, token_counts)
        shared = self._shared(x, tokens)  # while the tokens travel
        rows, local_ids, row_weights, handle = pending.wait()
        y, load = self.experts(rows, local_ids, row_weights)
        return self._finish(self.dispatch.combine(y, handle), shared, load, shape)

    def _forward_expert_major(self, x: torch.Tensor, router_input) -> torch.Tensor:
        shape = x.shape
        tokens, gates = self.gate.expert_major(router_input)  # [E, N] each
        x = x.reshape(-1, shape[-1])
        prepared = self.experts.quant_method.prepare_tokens(x)
        shared = self._shared(x, prepared)
        if len(self.placement.global_ids) < self.num_experts:  # this rank's experts' rows
            tokens, gates = tokens[self.placement.global_ids], gates[self.placement.global_ids]
        y, load = self.experts.forward_by_expert(prepared, tokens, gates)  # expert after expert
        rows = tokens.flatten()
        if kernels.available(y):  # each token's rows and its shared expert's summed in fp32: one pass, no atomics
            return self._finish(moe_kernels.combine_by_token(y, rows, x.shape[0], add=shared), None, load, shape)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, rows, y.float()).to(x.dtype)
        return self._finish(out, shared, load, shape)

    def _shared(self, x: torch.Tensor, prepared) -> torch.Tensor | None:
        if self.shared_expert is None:
            return None
        return self.shared_expert(prepared if self.shared_takes_prepared else x)

    def _finish(self, routed: torch.Tensor, shared: torch.Tensor | None, load: torch.Tensor, shape) -> torch.Tensor:
        """This rank's routed partial sums plus its shared expert's, summed over TP; the load counted."""
        self.expert_load.index_add_(0, self.placement.global_ids, load)
        if shared is not None:
            routed = routed + shared
        return all_reduce(routed, self.parallel.tp).reshape(shape)

    # -- weight loading ----------------------------------------------------------------------

    def owns_expert(self, expert: int) -> bool:
        return bool(self.placement.expert_map[expert] >= 0)

    def load_expert_weight(self, expert: int, kind: str, source, scale=None):
        """kind: 'up_gate_proj' (fused [up; gate], [2I, D]), 'up_proj' or 'gate_proj' (one half,
        [I, D], for checkpoints that store them apart) or 'down_proj' ([D, I]), unsharded in
        `source` (a tensor or a safetensors slice); `scale`: the weight scale a pre-quantized
        checkpoint stores beside it. Call only for experts this rank owns."""
        local = int(self.placement.expert_map[expert])
        if local < 0:
            raise ValueError(f"expert {expert} is not held by this rank (holds {self.local_expert_ids})")
        t = self.parallel.tp
        shards, rank = (t.size, t.rank) if self.expert_tp > 1 else (1, 0)
        if scale is not None:  # a pre-quantized checkpoint's: its method knows how it shards
            scale = self.experts.quant_method.shard_stored_scale(scale, kind, rank, shards)
        if kind == "up_gate_proj":
            value = read_row_shard(source, rank, shards, parts=2)
        elif kind in ("up_proj", "gate_proj"):
            return self._load_half(local, kind, read_row_shard(source, rank, shards), scale, expert)
        elif kind == "down_proj":
            value = read_col_shard(source, rank, shards)
        else:
            raise ValueError(f"unknown expert weight {kind!r}; expected up_gate_proj, up_proj, gate_proj or down_proj")
        self.experts.load_expert(local, kind, value, scale, f"experts.{expert}.{kind}")

    def _load_half(self, local: int, kind: str, value, scale, expert: int):
        """One half of the fused [up; gate] weight: held until its other half arrives, then both
        load together (a quantizing method needs the whole rows' values at once)."""
        halves = self._pending_halves.setdefault(local, {})
        halves[kind] = (value, scale)
        if len(halves) < 2:
            return
        (up, up_scale), (gate, gate_scale) = halves.pop("up_proj"), halves.pop("gate_proj")
        del self._pending_halves[local]
        if (up_scale is None) != (gate_scale is None):
            raise ValueError(f"experts.{expert}: up_proj and gate_proj must both have a weight scale or neither")
        scale = None if up_scale is None else torch.cat([up_scale, gate_scale])
        self.experts.load_expert(local, "up_gate_proj", torch.cat([up, gate]), scale, f"experts.{expert}.up_gate_proj")

    def reset_routing_stats(self):
        self.expert_load.zero_()


def moe_layers(module: nn.Module) -> list[MoELayer]:
    """The MoE layers of a model (this rank's part), in module order."""
    return [m for m in module.modules() if isinstance(m, MoELayer)]


def experts_stay_on_device(module: nn.Module, device: torch.device) -> bool:
    """Whether every MoE layer of module, given rows on device, keeps its row counts there (the
    grouped path; the per-expert loop reads them on the host): what a CUDA graph can hold."""
    return all(layer.experts.uses_grouped_mm(torch.empty(0, layer.experts.hidden_size, dtype=layer.experts.dtype,
                                                         device=device)) for layer in moe_layers(module))


def reset_token_counts(module: nn.Module) -> None:
    """Starts the MoE layers in module over on their token counts (dispatch.TokenCounts): call on
    every rank wherever the token layout may change (a new batch, a prefill and the steps after it)."""
    for layer in moe_layers(module):
        if layer.token_counts is not None:
            layer.token_counts.reset()
