"""The built-in model draws what held-out prompts say (issue 6's bar), on 2 CPU ranks with EP."""

from epdiff.engine import ImageGenerator
from epdiff.train.score import score_heldout


def test_builtin_model_draws_held_out_prompts():
    # The first 8 held-out prompts (one- and two-object scenes never seen in training), the
    # model's own sampling settings (30 steps, guidance 4); ~45 s on 2 CPU cores.
    generator = ImageGenerator(tensor_parallel_size=2, enable_expert_parallel=True)
    summary = score_heldout(generator, num_prompts=8)
    assert summary["accuracy"] >= 0.9, summary["report"]
    assert summary["idle_experts"] == {0: 0}, summary["idle_experts"]  # every expert of every layer is used
