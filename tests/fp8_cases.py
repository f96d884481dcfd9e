"""FP8 cases run inside the world's workers (see world.py): the MoE layer and the whole
transformer with FP8 experts on a parallel layout against one rank with FP8 experts."""

from __future__ import annotations

from epdiff.distributed.parallel_state import ParallelState
from epdiff.moe import MoELayer
from epdiff.quantization import get_quantization_config
from moe_cases import SMALL, load_moe_block, make_tokens, make_weights, token_counts

FP8 = get_quantization_config("fp8")


def moe_equivalence(rank: int, layouts, tokens: int = 12):
    """Per layout (a ParallelConfig): this rank's FP8 MoE output against the same FP8 layer on one
    process (and the grouped path against the per-expert loop)."""
    rows = []
    single = ParallelState.single()
    for config in layouts:
        ep, backend = config.enable_expert_parallel, config.all2all_backend
        state = ParallelState.build(config, "cpu")
        for routing, kernel in (("random", "loop"), ("skewed", "grouped_mm")):
            w, common = make_weights(11, routing, True, config.ep_size)
            counts = token_counts(state.token.size, tokens, empty_rank=routing == "skewed")
            x_all = make_tokens(11, counts, routing, common)
            start = sum(counts[: state.token.rank])
            x = x_all[start: start + counts[state.token.rank]]
            out = _fp8_layer(state, w, kernel)(x)
            one = _fp8_layer(single, w, "loop")(x)
            err = float((out - one).abs().max()) if x.numel() else 0.0
            rows.append(dict(layout=config.describe(), ep=ep, backend=backend, routing=routing, kernel=kernel,
                             rank=rank, err=err, scale=float(one.abs().max()) if x.numel() else 1.0))
    return rows


def _fp8_layer(state, w, kernel):
    d = SMALL
    layer = MoELayer(d.hidden, d.experts, d.top_k, d.inter, state, shared_intermediate_size=d.shared_inter,
                     expert_kernel=kernel, device=state.device, quant_config=FP8)
    load_moe_block(layer, w)
    return layer


