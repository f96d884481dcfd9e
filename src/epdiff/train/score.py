"""Score a model on the held-out shape prompts: draw them on any layout, check each image."""

from __future__ import annotations

from . import checker, shapes


def heldout_captions(num_prompts: int) -> list[str]:
    """The first num_prompts held-out captions (scenes never seen in training, in hash order)."""
    _, heldout = shapes.split_scenes()
    if not 1 <= num_prompts <= len(heldout):
        raise ValueError(f"num_prompts={num_prompts}: there are 1 to {len(heldout)} held-out prompts")
    return [shapes.caption(s) for s in heldout[:num_prompts]]


def _tokens_per_expert(generator) -> dict[int, list[list[int]]]:
    return {stage["stage"]: stage["tokens_per_expert"] for stage in generator.routing_stats()}


def score_heldout(generator, num_prompts: int = 40, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seeds=(0,)) -> dict | None:
    """The checker's summary (`checker.summarize`) of the first num_prompts held-out prompts drawn
    once with each seed (prompt i with seed + i), over all seeds together, plus "per_seed":
    {seed: summary}, the sampling settings used, and "idle_experts": per pipeline stage, the
    (layer, expert) pairs that no token of these requests reached. None off the driving rank."""
    captions = heldout_captions(num_prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    settings = generator.requests(captions[:1], num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale)[0]  # the model's defaults filled in
    before = _tokens_per_expert(generator)
    scores, per_seed = [], {}
    for seed in seeds:
        images = generator.generate(captions, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, seed=seed)
        if not images:
            return None
        per_seed[seed] = checker.summarize([checker.score(text, image) for text, image in zip(captions, images)])
        scores += per_seed[seed]["scores"]
    summary = checker.summarize(scores)
    summary.update(per_seed=per_seed, seeds=seeds, num_inference_steps=settings.num_inference_steps,
                   guidance_scale=settings.guidance_scale)
    summary["idle_experts"] = _idle_experts(before, _tokens_per_expert(generator))
    return summary


def _idle_experts(before: dict, after: dict) -> dict[int, int]:
    """Per stage, the (layer, expert) pairs whose token count did not grow from before to after."""
    idle = {}
    for stage, counts in after.items():
        earlier = before.get(stage) or [[0] * len(layer) for layer in counts]
        idle[stage] = sum(n == m for layer, old in zip(counts, earlier) for n, m in zip(layer, old))
    return idle
