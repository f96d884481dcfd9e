"""Score a model on shape prompts (held-out scenes, or captions that leave out size or position):
draw them on any layout, check each image."""

from __future__ import annotations

from . import checker, shapes


def captions(num_prompts: int, prompt_set: str = "heldout") -> list[str]:
    """The first num_prompts captions of a prompt set (each in hash order: a prefix is a fair sample)."""
    if prompt_set not in shapes.PROMPT_SETS:
        raise ValueError(f"prompt set {prompt_set!r}: choose one of {', '.join(shapes.PROMPT_SETS)}")
    scenes = shapes.PROMPT_SETS[prompt_set]()
    if not 1 <= num_prompts <= len(scenes):
        raise ValueError(f"num_prompts={num_prompts}: there are 1 to {len(scenes)} {prompt_set} prompts")
    return [shapes.caption(s) for s in scenes[:num_prompts]]


def _tokens_per_expert(generator) -> dict[int, list[list[int]]]:
    return {stage["stage"]: stage["tokens_per_expert"] for stage in generator.routing_stats()}


def score_prompts(generator, num_prompts: int = 40, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seeds=(0,), prompt_set: str = "heldout") -> dict | None:
    """The checker's summary (`checker.summarize`) of the first num_prompts prompts of a set drawn
    once with each seed (prompt i with seed + i), over all seeds together, plus "per_seed":
    {seed: summary}, the sampling settings used, and "idle_experts": per pipeline stage, the
    (layer, expert) pairs that no token of these requests reached. None off the driving rank."""
    prompts = captions(num_prompts, prompt_set)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    settings = generator.requests(prompts[:1], num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale)[0]  # the model's defaults filled in
    before = _tokens_per_expert(generator)
    scores, per_seed = [], {}
    for seed in seeds:
        images = generator.generate(prompts, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, seed=seed)
        if not images:
            return None
        per_seed[seed] = checker.summarize([checker.score(text, image) for text, image in zip(prompts, images)])
        scores += per_seed[seed]["scores"]
    summary = checker.summarize(scores)
    summary.update(prompt_set=prompt_set, per_seed=per_seed, seeds=seeds, num_inference_steps=settings.num_inference_steps,
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
