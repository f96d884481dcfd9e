"""Expert-choice routing (Nucleus-Image's, docs/architecture.md 'The MoE block'): the MoE layer with
an ExpertChoiceRouter equals diffusers' NucleusMoELayer written out in float64, every expert takes
exactly C tokens per image, and every layout (SP splitting an image's tokens, CFG and DP holding
images apart, TP; EP over every registered backend) gives the one-rank result."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from layouts import BACKENDS, layout
from moe_cases import (EC_IMAGES, EC_TOKENS, SMALL, expert_choice_equivalence, expert_choice_inputs,
                       expert_choice_layer, reference_expert_choice)


@torch.inference_mode()
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
@pytest.mark.parametrize("expert_major", [True, False], ids=["expert-major", "token-centric"])
def test_expert_choice_equals_the_reference_and_balances_every_expert(kernel, expert_major):
    if kernel == "grouped_mm" and not hasattr(torch.nn.functional, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    w, x, r = expert_choice_inputs(3)
    layer = expert_choice_layer(ParallelState.single(), w, 2 * SMALL.hidden, kernel)
    # One rank holding whole images: the experts get exactly their rows (expert-major); the
    # token-centric form (a slot per expert, what the dispatchers move) gives the same.
    assert layer.expert_major
    layer.expert_major = expert_major
    out = layer(x, router_input=r)
    torch.testing.assert_close(out.double(), reference_expert_choice(x, r, w), rtol=1e-5, atol=1e-6)
    capacity = layer.gate.capacity(EC_TOKENS)
    assert layer.expert_load.tolist() == [EC_IMAGES * capacity] * SMALL.experts  # C tokens per image each
    with pytest.raises(ValueError, match="expert choice routes whole images"):
        layer(x.reshape(-1, SMALL.hidden), router_input=r.reshape(-1, 2 * SMALL.hidden))


LAYOUTS = {2: [layout(sp=2), layout(cfg=2), layout(dp=2), layout(tp=2)],
           4: [layout(sp=4), layout(sp=2, cfg=2), layout(tp=2, sp=2), layout(sp=2, dp=2)]}


@pytest.mark.parametrize("world", [2, 4])
def test_expert_choice_on_every_layout_equals_one_rank(world8, world):
    configs = [c.replace(enable_expert_parallel=True, all2all_backend=b) for c in LAYOUTS[world] for b in BACKENDS]
    configs += LAYOUTS[world]  # EP off: the experts' width over TP
    rows = [r for per_rank in world8.run(world, expert_choice_equivalence, configs) for r in per_rank]
    assert len(rows) == world * len(configs)
    bad = [r for r in rows if r["err"] > 1e-5 * r["scale"]]
    assert not bad, bad[:5]
