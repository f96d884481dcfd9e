"""Score a model on the held-out shape prompts: draw them on any layout, check each image."""

from __future__ import annotations

from PIL import Image

from . import checker, shapes


def score_heldout(generator, num_prompts: int = 20, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int = 0) -> dict | None:
    """The checker's summary for the first num_prompts held-out prompts, plus "idle_experts":
    per pipeline stage, the (layer, expert) pairs that received no token. None off rank 0."""
    _, heldout = shapes.split_scenes()
    captions = [shapes.caption(s) for s in heldout][:num_prompts]
    request = generator.request(captions, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                seed=seed, show_progress=False)
    out = generator.run(request, routing_stats=True)
    if out is None:
        return None
    images = [Image.fromarray(pixels.numpy()) for _, _, _, _, pixels in out["images"]]
    summary = checker.score_images(list(zip(captions, images)))
    summary["idle_experts"] = {stage["stage"]: sum(n == 0 for layer in stage["tokens_per_expert"] for n in layer)
                               for stage in out["routing"]}
    return summary
