"""FP8 experts on parallel layouts (CPU, gloo, the persistent world): the MoE layer and the whole
transformer equal one rank with FP8 experts.

With EP every (token, expert) pair is computed on one rank from the same float8 weights and the
same per-row activation scales (FP8 tokens are quantized before they travel, exactly as the
expert path would quantize them), so EP layouts match one rank up to summation order. Without EP
the experts' width is split over TP and the activation scale of the second GEMM is per row of a
rank's slice (as vLLM's TP FP8 MoE does): those layouts match one rank within FP8 error only.
"""

import pytest

from fp8_cases import moe_equivalence
from layouts import BACKENDS, layout
from model_cases import equivalence

# EP layouts run over every registered backend; the last of each world runs EP off.
MOE_LAYOUTS = {
    2: [layout(tp=2), layout(cfg=2), layout(sp=2)],
    4: [layout(tp=2, cfg=2), layout(cfg=2, dp=2)],
    8: [layout(tp=2, sp=2, cfg=2), layout(sp=2, cfg=2, dp=2)],
}
EP_OFF = {2: layout(tp=2), 4: layout(tp=4), 8: layout(tp=2, dp=4)}


def moe_layouts(world):
    return [c.replace(enable_expert_parallel=True, all2all_backend=b) for c in MOE_LAYOUTS[world] for b in BACKENDS] \
        + [EP_OFF[world]]
EXACT, FP8_ERROR = 1e-5, 0.08  # relative to the largest output


def check(rows):
    assert rows
    bad = [r for r in rows if r["err"] > (EXACT if r["ep"] else FP8_ERROR) * r["scale"]]
    assert not bad, "\n".join(f"{r['layout']} EP={r['ep']} {r['backend']} rank {r['rank']} {r.get('routing', '')}: "
                              f"max err {r['err']:.2e} (scale {r['scale']:.2e})" for r in bad[:20])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_fp8_moe_layouts_match_one_rank(world8, world):
    layouts = moe_layouts(world)
    rows = [r for per_rank in world8.run(world, moe_equivalence, layouts) for r in per_rank]
    check(rows)
    assert len(rows) == world * len(layouts) * 2


@pytest.mark.parametrize("config", [layout(cfg=2), layout(tp=2, cfg=2), layout(sp=2, pp=2)],
                         ids=lambda c: c.describe())
def test_fp8_transformer_layouts_match_one_rank(world8, tiny_model, config):
    model = tiny_model(image_base_size=128, num_experts=8, seed=3)
    modes = [config.replace(enable_expert_parallel=True, all2all_backend=b) for b in BACKENDS]
    rows = [r for per_rank in world8.run(config.world_size, equivalence, model, modes, "fp8") for r in per_rank]
    check(rows)
    assert len(rows) == config.world_size * len(modes)
