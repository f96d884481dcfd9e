"""Invariants 1 and 3 of docs/architecture.md, "The MoE block", and the expert kernels against each other."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from layouts import layout
from moe_cases import (EXPERTS, HIDDEN, INTER, build_layer, holdings, make_tokens, make_weights,
                       reference_moe)

# Invariant 1 (each (token, expert) pair computed exactly once in the EP group) is checked by
# counting in every case of test_moe_parallel.py: the pairs computed per expert, summed over the
# EP group, must equal the routing histogram of all distinct tokens. A duplicate across TP ranks
# or a dropped pair changes that sum.


@pytest.mark.parametrize("config", [layout(tp=2, dp=2, ep=True), layout(sp=2, cfg=2, ep=True, placement="round_robin"),
                                    layout(tp=2, sp=2, ep=True, placement="round_robin"), layout(tp=4, ep=True)],
                         ids=lambda c: c.describe())
def test_rank_holds_exactly_its_local_experts(world8, config):
    results = world8.run(4, holdings, config)
    per_rank = EXPERTS // 4
    seen = sorted(e for r in results for e in r["ids"])
    assert seen == list(range(EXPERTS)), "every expert is held by exactly one rank of the EP group"
    for r in results:
        assert len(r["ids"]) == per_rank and r["up_gate_proj"] == (per_rank, 2 * INTER, HIDDEN)
        assert r["exact"], f"ep rank {r['ep_rank']}: a local expert's weights differ from the checkpoint's"
        assert r["expert_params"] == per_rank * 3 * INTER * HIDDEN
        if config.expert_placement == "round_robin":
            assert r["ids"] == list(range(r["ep_rank"], EXPERTS, 4))
        else:
            assert r["ids"] == list(range(r["ep_rank"] * per_rank, (r["ep_rank"] + 1) * per_rank))


@pytest.mark.parametrize("shared", [False, True])
def test_grouped_mm_kernel_matches_loop_and_reference(shared):
    if not hasattr(torch.nn.functional, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    w, common = make_weights(3, "skewed", shared, 1)
    x = make_tokens(3, [40], "skewed", common)
    with torch.inference_mode():
        single = ParallelState.single()
        loop = build_layer(single, w, shared, kernel="loop")(x)
        grouped = build_layer(single, w, shared, kernel="grouped_mm")(x)
    ref, _ = reference_moe(x, w, shared)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped.double(), ref, rtol=1e-4, atol=1e-5)


def test_routing_options():
    from epdiff.moe import Router
    r = Router(8, 6, 2, scoring="sigmoid", renormalize=False)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(5, 8)
    ids, weights = r(x)
    expect = torch.sigmoid(x @ r.weight.t()).topk(2, dim=-1)
    torch.testing.assert_close(weights, expect.values)
    assert torch.equal(ids, expect.indices)
    r.renormalize = True
    torch.testing.assert_close(r(x)[1].sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="scoring 'tanh'"):
        Router(8, 6, 2, scoring="tanh")
