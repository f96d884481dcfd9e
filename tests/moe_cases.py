"""MoE-layer cases that run inside the world's workers (see world.py)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epdiff.distributed import collectives as C
from epdiff.distributed.parallel_state import ParallelState
from epdiff.loader.slicing import copy_checked
from epdiff.moe import MoELayer, collect_routing_stats
from layouts import BACKENDS, PLACEMENT_NAMES

HIDDEN, INTER, SHARED_INTER, EXPERTS, TOP_K = 32, 16, 16, 16, 4


@dataclass(frozen=True)
class Dims:
    hidden: int = HIDDEN
    inter: int = INTER
    shared_inter: int = SHARED_INTER
    experts: int = EXPERTS
    top_k: int = TOP_K


SMALL = Dims()


def make_weights(seed: int, routing: str, shared: bool, ep_size: int, d: Dims = SMALL):
    g = torch.Generator().manual_seed(seed)
    scale_in, scale_out = 1.1 / d.hidden ** 0.5, 1.1 / d.inter ** 0.5
    w = {
        "gate.weight": torch.randn(d.experts, d.hidden, generator=g) * 2.8 / d.hidden ** 0.5,
        **{f"experts.{e}.up_gate_proj": torch.randn(2 * d.inter, d.hidden, generator=g) * scale_in
           for e in range(d.experts)},
        **{f"experts.{e}.down_proj": torch.randn(d.hidden, d.inter, generator=g) * scale_out
           for e in range(d.experts)},
    }
    if shared:
        w["shared_expert.up_gate_proj"] = torch.randn(2 * d.shared_inter, d.hidden, generator=g) * scale_in
        w["shared_expert.down_proj"] = torch.randn(d.hidden, d.shared_inter, generator=g) * 1.1 / d.shared_inter ** 0.5
    common = F.normalize(torch.randn(d.hidden, generator=g), dim=0)
    if routing == "skewed":
        # Tokens share a direction; experts 0 and 1 point along it (nearly every token picks them)
        # and the experts of the last EP rank point against it (no token picks them).
        gate = w["gate.weight"]
        gate[:2] += 6.0 * common
        gate[d.experts - d.experts // max(ep_size, 2):] -= 12.0 * common
    return w, common


def make_tokens(seed: int, counts: list[int], routing: str, common: torch.Tensor):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(counts), common.shape[0], generator=g)
    if routing == "skewed":
        x = x + 3.0 * common
    return x


def reference_moe(x: torch.Tensor, w: dict, shared: bool, d: Dims = SMALL) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 MoE, token by token: out and the routing histogram [E]."""
    x = x.double()
    probs = (x @ w["gate.weight"].double().t()).softmax(-1)
    top_w, top_i = probs.topk(d.top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(d.experts):
        up, gate = (x @ w[f"experts.{e}.up_gate_proj"].double().t()).chunk(2, -1)
        y = (up * F.silu(gate)) @ w[f"experts.{e}.down_proj"].double().t()
        out += (top_w * (top_i == e)).sum(-1, keepdim=True) * y
    if shared:
        up, gate = (x @ w["shared_expert.up_gate_proj"].double().t()).chunk(2, -1)
        out += (up * F.silu(gate)) @ w["shared_expert.down_proj"].double().t()
    return out, torch.bincount(top_i.flatten(), minlength=d.experts)


def token_counts(group_size: int, tokens: int, empty_rank: bool) -> list[int]:
    counts = [tokens + (3 * i) % 5 for i in range(group_size)]  # uneven on purpose
    if empty_rank and group_size > 1:
        counts[1] = 0
    return counts


def load_moe_block(moe: MoELayer, w: dict[str, torch.Tensor]) -> None:
    """One MoE block from unsharded tensors named as the layer names them (make_weights')."""
    copy_checked(moe.gate.weight, w["gate.weight"].float(), "gate.weight")
    for e in moe.local_expert_ids:
        for kind in ("up_gate_proj", "down_proj"):
            moe.load_expert_weight(e, kind, w[f"experts.{e}.{kind}"])
    if moe.shared_expert is not None:
        for linear in ("up_gate_proj", "down_proj"):
            getattr(moe.shared_expert, linear).load_weight(w[f"shared_expert.{linear}"], linear)


def build_layer(state, w, shared, kernel="loop", d: Dims = SMALL, dtype=torch.float32):
    layer = MoELayer(d.hidden, d.experts, d.top_k, d.inter, state,
                     shared_intermediate_size=d.shared_inter if shared else 0, expert_kernel=kernel,
                     dtype=dtype, device=state.device)
    load_moe_block(layer, {k: v.to(state.device) for k, v in w.items()})
    return layer


def equivalence(rank: int, layouts, variants, tokens: int = 12, placements=PLACEMENT_NAMES):
    """For each layout of the current world (a ParallelConfig, EP off) with EP off and with EP on
    over every registered backend and each of `placements`, and each variant, run the MoE layer and
    compare this rank's tokens with (a) the same layer on one process and (b) the float64
    reference. Returns one record per (layout, variant) from every participating rank."""
    records = []
    for config in layouts:
        for backend, placement in itertools.product(BACKENDS, placements):
            records += _run_layout(rank, config.replace(enable_expert_parallel=True, all2all_backend=backend,
                                                        expert_placement=placement), variants, tokens)
        records += _run_layout(rank, config, variants, tokens)
    return records


def _run_layout(rank, config, variants, tokens):
    state = ParallelState.build(config, "cpu")
    records = []
    single = ParallelState.single()
    for shared, routing, empty in variants:
        seed = 1000 * shared + 10 * (routing == "skewed") + empty
        w, common = make_weights(seed, routing, shared, config.ep_size)
        counts = token_counts(state.token.size, tokens, empty)
        x_all = make_tokens(seed, counts, routing, common)
        start = sum(counts[: state.token.rank])
        x = x_all[start: start + counts[state.token.rank]]

        layer = build_layer(state, w, shared)
        out = layer(x)
        stats = collect_routing_stats([layer], state)
        ref_single = build_layer(single, w, shared)(x)
        ref64, hist = reference_moe(x_all, w, shared)
        ref64 = ref64[start: start + counts[state.token.rank]]
        records.append(dict(
            layout=config.describe(), shared=shared, routing=routing, empty=empty, rank=rank,
            tokens=x.shape[0],
            close_single=bool(torch.allclose(out, ref_single, rtol=1e-5, atol=1e-6)),
            err_single=float((out - ref_single).abs().max()) if x.numel() else 0.0,
            err_ref=float((out.double() - ref64).abs().max()) if x.numel() else 0.0,
            load_ok=bool(torch.equal(stats.tokens_per_expert[0], hist)),
            load=stats.tokens_per_expert[0].tolist(), hist=hist.tolist(),
            idle_rank=bool((stats.tokens_per_rank[0] == 0).any()),
        ))
    return records


def holdings(rank: int, config):
    """Invariant 3: the experts this rank's module holds, and whether each equals its global expert."""
    state = ParallelState.build(config, "cpu")
    w, _ = make_weights(7, "random", True, config.ep_size)
    layer = build_layer(state, w, shared=True)
    ids = layer.local_expert_ids
    exact = all(torch.equal(layer.experts.up_gate_proj[i], w[f"experts.{e}.up_gate_proj"])
                and torch.equal(layer.experts.down_proj[i], w[f"experts.{e}.down_proj"])
                for i, e in enumerate(ids))
    expert_params = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("experts."))
    return dict(ep_rank=state.ep.rank, ids=ids, exact=exact, expert_params=expert_params,
                up_gate_proj=tuple(layer.experts.up_gate_proj.shape))


# -- expert choice (Nucleus-Image's routing) ---------------------------------------------------------

EC_IMAGES, EC_TOKENS, EC_CAPACITY, EC_SCALE = 2, 16, 1.5, 2.5  # C = ceil(1.5 · 16 / 16) = 2 per expert


def expert_choice_layer(state, w, router_input_size, kernel="loop", d: Dims = SMALL):
    from epdiff.moe.router import ExpertChoiceRouter

    router = ExpertChoiceRouter(router_input_size, d.experts, EC_CAPACITY, state.sp, route_scale=EC_SCALE)
    layer = MoELayer(d.hidden, d.experts, d.experts, d.inter, state, shared_intermediate_size=d.shared_inter,
                     expert_kernel=kernel, device=state.device, router=router)
    load_moe_block(layer, {**w, "gate.weight": w["router"]})
    return layer


def expert_choice_inputs(seed: int, d: Dims = SMALL):
    """Weights, and per image: hidden states [B, S, D] and router inputs [B, S, 2D] (a timestep
    embedding beside the unmodulated state, as Nucleus-Image routes)."""
    w, _ = make_weights(seed, "random", True, 1, d)
    g = torch.Generator().manual_seed(seed + 7)
    w["router"] = torch.randn(d.experts, 2 * d.hidden, generator=g) * 0.5
    x = torch.randn(EC_IMAGES, EC_TOKENS, d.hidden, generator=g)
    r = torch.cat([torch.randn(EC_IMAGES, 1, d.hidden, generator=g).expand(-1, EC_TOKENS, -1),
                   torch.randn(EC_IMAGES, EC_TOKENS, d.hidden, generator=g)], dim=-1)
    return w, x, r


def reference_expert_choice(x, r, w, d: Dims = SMALL) -> torch.Tensor:
    """diffusers' NucleusMoELayer, written out in float64: each expert's top-C tokens per image,
    a token's gates over the experts that chose it, times route_scale; the shared expert on all."""
    x, r = x.double(), r.double()
    B, S, D = x.shape
    affinity = (r @ w["router"].double().t()).softmax(-1).transpose(1, 2)  # [B, E, S]
    capacity = max(1, math.ceil(EC_CAPACITY * S / d.experts))
    top = affinity.topk(capacity, dim=-1)
    gates = torch.zeros_like(affinity).scatter_(-1, top.indices, top.values)
    gates = gates / (gates.sum(1, keepdim=True) + 1e-12) * EC_SCALE  # [B, E, S]
    up, gate = (x @ w["shared_expert.up_gate_proj"].double().t()).chunk(2, -1)
    out = (up * F.silu(gate)) @ w["shared_expert.down_proj"].double().t()
    for e in range(d.experts):
        up, gate = (x @ w[f"experts.{e}.up_gate_proj"].double().t()).chunk(2, -1)
        out += gates[:, e, :, None] * ((up * F.silu(gate)) @ w[f"experts.{e}.down_proj"].double().t())
    return out


def expert_choice_equivalence(rank: int, configs):
    """This rank's part of the expert-choice MoE on each layout against one rank: each DP x CFG
    group takes one of the images, each SP rank its chunk of that image's tokens."""
    w, x_all, r_all = expert_choice_inputs(3)
    one = expert_choice_layer(ParallelState.single(), w, 2 * SMALL.hidden)(x_all, router_input=r_all)
    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        image = (state.dp.rank * state.cfg.size + state.cfg.rank) % EC_IMAGES
        lo, hi = C.even_chunk(EC_TOKENS, state.sp.rank, state.sp.size)
        layer = expert_choice_layer(state, w, 2 * SMALL.hidden)
        out = layer(x_all[image:image + 1, lo:hi], router_input=r_all[image:image + 1, lo:hi])
        ref = one[image:image + 1, lo:hi]
        load = collect_routing_stats([layer], state).tokens_per_expert[0]
        rows.append(dict(layout=config.describe(), rank=rank, err=float((out - ref).abs().max()),
                         scale=float(ref.abs().max()), load=load.tolist()))
    return rows
