"""The full transformer (prefill + one denoising step, cond and uncond) on every parallel layout
equals the single-rank forward."""

import pytest

from epdiff.models.hunyuan_image3.make_tiny import make_tiny
from model_cases import equivalence

EP_MODES = [(False, "allgather_reducescatter"), (True, "allgather_reducescatter"), (True, "alltoall")]

# (tp, sp, cfg, dp, pp)
LAYOUTS = {
    2: [(2, 1, 1, 1, 1), (1, 2, 1, 1, 1), (1, 1, 2, 1, 1), (1, 1, 1, 2, 1), (1, 1, 1, 1, 2)],
    4: [(2, 1, 2, 1, 1), (2, 2, 1, 1, 1), (1, 2, 2, 1, 1), (1, 1, 2, 2, 1), (2, 1, 1, 1, 2), (1, 2, 1, 1, 2),
        (1, 1, 1, 2, 2), (4, 1, 1, 1, 1), (1, 4, 1, 1, 1), (1, 1, 1, 4, 1)],
    8: [(2, 2, 2, 1, 1), (2, 1, 2, 2, 1), (1, 2, 2, 1, 2), (2, 1, 1, 2, 2), (1, 1, 2, 4, 1)],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny")), image_base_size=128, num_experts=8, seed=3)


def check(rows):
    bad = [r for r in rows if not r["close"]]
    assert not bad, "\n".join(f"{r['layout']} rank {r['rank']} branches {r['branches']}: max err {r['err']:.2e} "
                              f"(scale {r['scale']:.2e})" for r in bad[:20])


@pytest.mark.parametrize("world", [1, 2, 4, pytest.param(8, marks=pytest.mark.slow)])
def test_transformer_layouts_match_single_rank(world8, tiny_dir, world):
    layouts = LAYOUTS.get(world, [(1, 1, 1, 1, 1)])
    rows = []
    for layout in layouts:
        for per_rank in world8.run(world, equivalence, tiny_dir, layout, EP_MODES):
            rows += per_rank
    check(rows)
    assert len(rows) == world * len(layouts) * len(EP_MODES)
