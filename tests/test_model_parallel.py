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


def test_a_new_batch_after_prefill_is_refused(tiny_dir):
    """Token counts are gathered on the first step after prefill() and reused: a step with another
    batch must say so rather than run a collective its peers do not run."""
    import torch

    from epdiff.distributed.parallel_state import ParallelState
    from epdiff.models.hunyuan_image3.weights import load_model
    from model_cases import PROMPTS, sequences, step_inputs

    model, _ = load_model(tiny_dir, ParallelState.single())
    seq = sequences(tiny_dir, PROMPTS[0])[0]
    ts = seq.timestep_index
    latents, t = step_inputs(seq, 0, model.config.latent_channels)
    positions = seq.positions[ts: seq.image_start + seq.image_len]
    with torch.inference_mode():
        caches = model.prefill(seq.input_ids[None, :ts], seq.positions[:ts])
        model(latents, t, positions, caches)
        with pytest.raises(ValueError, match="call prefill"):
            model(latents.expand(2, -1, -1, -1), t.expand(2), positions, caches)
