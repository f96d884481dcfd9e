"""FP8 experts on parallel layouts (CPU, gloo, the persistent world): the MoE layer and the whole
transformer equal one rank with FP8 experts.

With EP every (token, expert) pair is computed on one rank from the same float8 weights and the
same per-row activation scales (FP8 tokens are quantized before they travel, exactly as the
expert path would quantize them), so EP layouts match one rank up to summation order. Without EP
the experts' width is split over TP and the activation scale of the second GEMM is per row of a
rank's slice (as vLLM's TP FP8 MoE does): those layouts match one rank within FP8 error only.
"""

import pytest

from epdiff.models.hunyuan_image3.make_tiny import make_tiny
from fp8_cases import moe_equivalence
from model_cases import equivalence

AGRS, A2A = "allgather_reducescatter", "alltoall"
# (tp, sp, cfg, dp, ep, backend)
MOE_LAYOUTS = {
    2: [(2, 1, 1, 1, True, AGRS), (1, 1, 2, 1, True, AGRS), (1, 2, 1, 1, True, A2A), (2, 1, 1, 1, False, AGRS)],
    4: [(2, 1, 2, 1, True, AGRS), (1, 1, 2, 2, True, A2A), (4, 1, 1, 1, False, AGRS)],
    8: [(2, 2, 2, 1, True, AGRS), (1, 2, 2, 2, True, A2A)],
}
EXACT, FP8_ERROR = 1e-5, 0.08  # relative to the largest output


def check(rows):
    assert rows
    bad = [r for r in rows if r["err"] > (EXACT if r["ep"] else FP8_ERROR) * r["scale"]]
    assert not bad, "\n".join(f"{r['layout']} EP={r['ep']} {r['backend']} rank {r['rank']} {r.get('routing', '')}: "
                              f"max err {r['err']:.2e} (scale {r['scale']:.2e})" for r in bad[:20])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_fp8_moe_layouts_match_one_rank(world8, world):
    rows = [r for per_rank in world8.run(world, moe_equivalence, MOE_LAYOUTS[world]) for r in per_rank]
    check(rows)
    assert len(rows) == world * len(MOE_LAYOUTS[world]) * 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny")), image_base_size=128, num_experts=8, seed=3)


@pytest.mark.parametrize("world, layout", [(2, (1, 1, 2, 1, 1)), (4, (2, 1, 2, 1, 1)), (4, (1, 2, 1, 1, 2))])
def test_fp8_transformer_layouts_match_one_rank(world8, tiny_dir, world, layout):
    rows = [r for per_rank in world8.run(world, equivalence, tiny_dir, layout, [(True, AGRS), (True, A2A)], "fp8")
            for r in per_rank]
    check(rows)
