"""Multi-rank equivalence of the MoE layer: every layout of 1, 2, 4 and 8 ranks equals one rank."""

import itertools

import pytest

from layouts import factorizations, layout
from moe_cases import equivalence

VARIANTS = [(shared, routing, empty) for shared, routing, empty in
            itertools.product((False, True), ("random", "skewed"), (False, True))
            if not (routing == "random" and empty)]


def check(records):
    assert records, "no rank ran a case"
    bad = [r for r in records if not (r["close_single"] and r["err_ref"] < 1e-4 and r["load_ok"])]
    assert not bad, "\n".join(
        f"{r['layout']} shared={r['shared']} {r['routing']} empty={r['empty']} rank {r['rank']}: "
        f"err vs 1 rank {r['err_single']:.2e}, vs fp64 {r['err_ref']:.2e}, load {r['load']} != {r['hist']}"
        for r in bad[:20])


# Every layout of up to 4 ranks; of the 16 of 8 ranks, those with the largest groups of each axis
# and the ones that mix all four (a group build of 8 gloo ranks costs ~1 s, and each layout runs 5
# EP modes: all 16 took 72 s of the suite).
EIGHT = [layout(tp=8), layout(sp=8), layout(dp=8), layout(cfg=2, dp=4), layout(tp=2, sp=2, cfg=2),
         layout(tp=2, sp=2, dp=2), layout(sp=2, cfg=2, dp=2)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_layout_matches_single_rank(world8, world):
    layouts = factorizations(world) if world < 8 else EIGHT
    records = []
    for config in layouts:  # a fresh process group per layout frees the previous one's groups
        records += [r for per_rank in world8.run(world, equivalence, [config], VARIANTS) for r in per_rank]
    check(records)
    # Skewed routing leaves the last EP rank's experts idle: the "rank receives nothing" case ran.
    if world > 1:
        assert any(r["idle_rank"] for r in records if r["routing"] == "skewed")
    # Every layout and EP mode ran on every participating rank.
    assert {r["layout"] for r in records} >= {config.describe() for config in layouts}
