"""The Python API: an offline image generator over any parallel layout.

    from epdiff import ImageGenerator
    generator = ImageGenerator(tensor_parallel_size=2, enable_expert_parallel=True)
    images = generator.generate("a small red circle on the left", seed=1234)
    images[0].save("out.png")

Started as one process it spawns one worker per rank for each `generate` call; under torchrun
every rank runs the call and rank 0 gets the images.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from .config import ParallelConfig
from .distributed.launch import launch
from .distributed.parallel_state import ParallelState
from .moe.stats import collect_routing_stats
from .pipeline.request import GenerationRequest
from .pipeline.text_to_image import TextToImagePipeline, gather_to_rank0


def image_path(output: str, prompt_index: int, image_index: int, total: int) -> str:
    if total == 1:
        return output
    stem, ext = os.path.splitext(output)
    return f"{stem}-{prompt_index}-{image_index}{ext or '.png'}"


def png_metadata(request: GenerationRequest, prompt: str, prompt_index: int) -> PngInfo:
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("seed", str(request.seed + prompt_index))
    info.add_text("steps", str(request.num_inference_steps))
    info.add_text("guidance_scale", str(request.guidance_scale))
    info.add_text("size", f"{request.height}x{request.width}")
    info.add_text("parallel_layout", request.parallel.describe())
    info.add_text("model", os.path.basename(os.path.normpath(request.model)))
    info.add_text("software", "epdiff")
    return info


def generation_worker(device, request: GenerationRequest, routing_stats: bool):
    parallel = ParallelState.build(request.parallel, device)
    pipe = TextToImagePipeline(request, parallel)
    results = pipe()
    total = len(request.prompts) * request.num_images_per_prompt
    if pipe.decodes and request.output:  # each DP group's decode rank writes its own images
        for r in results:
            Image.fromarray(r.pixels.numpy()).save(
                image_path(request.output, r.prompt_index, r.image_index, total),
                pnginfo=png_metadata(request, r.prompt, r.prompt_index))
    stats = None
    if routing_stats and pipe.transformer.moe_layers:
        s = collect_routing_stats(pipe.transformer.moe_layers, parallel)
        stats = dict(stage=parallel.pp.rank, layers=pipe.transformer.layer_ids,
                     tokens_per_expert=s.tokens_per_expert.tolist(), summary=s.summary())
    mine = dict(metrics=asdict(pipe.metrics),
                images=[(r.prompt_index, r.image_index, r.prompt, r.latents.cpu(), r.pixels) for r in results]
                if pipe.decodes else [],
                routing=stats if parallel.ep.rank == 0 else None)
    everything = gather_to_rank0(mine)
    if everything is None:
        return None
    images = sorted((img for part in everything for img in part["images"]), key=lambda t: t[:2])
    if request.save_latents:
        save_file({f"prompt{p}_image{k}": lat.contiguous() for p, k, _, lat, _ in images}, request.save_latents,
                  metadata={"seed": str(request.seed), "layout": request.parallel.describe()})
    metrics = [part["metrics"] for part in everything]
    if request.metrics_json:
        with open(request.metrics_json, "w") as f:
            json.dump(metrics, f, indent=1)
    routing = [part["routing"] for part in everything if part["routing"]]
    return dict(images=images, metrics=metrics, routing=routing)


class ImageGenerator:
    def __init__(self, model: str | None = None, *, tensor_parallel_size: int = 1, sequence_parallel_size: int = 1,
                 cfg_parallel_size: int = 1, data_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, all2all_backend: str = "allgather_reducescatter",
                 expert_placement: str = "linear", dtype: str = "auto", load_format: str = "safetensors"):
        self.model, self.dtype, self.load_format = model, dtype, load_format
        self.parallel = ParallelConfig(
            tensor_parallel_size=tensor_parallel_size, sequence_parallel_size=sequence_parallel_size,
            cfg_parallel_size=cfg_parallel_size, data_parallel_size=data_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size, enable_expert_parallel=enable_expert_parallel,
            all2all_backend=all2all_backend, expert_placement=expert_placement)
        self.last_metrics = None
        self.last_routing = None

    def request(self, prompts, **kwargs) -> GenerationRequest:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return GenerationRequest(prompts=prompts, model=self.model, dtype=self.dtype, load_format=self.load_format,
                                 parallel=self.parallel, **kwargs).resolve()

    def run(self, request: GenerationRequest, routing_stats: bool = False) -> dict | None:
        """Runs a resolved request on every rank; rank 0 gets images, latents and metrics."""
        out = launch(request.parallel.world_size, generation_worker, request, routing_stats)
        if out is not None:
            self.last_metrics, self.last_routing = out["metrics"], out["routing"]
        return out

    def generate(self, prompts, *, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                 num_images_per_prompt: int = 1, show_progress: bool = True) -> list[Image.Image]:
        """Images in prompt order (num_images_per_prompt each). Empty on ranks other than 0."""
        request = self.request(prompts, height=height, width=width, num_inference_steps=num_inference_steps,
                               guidance_scale=guidance_scale, seed=seed, num_images_per_prompt=num_images_per_prompt,
                               show_progress=show_progress)
        out = self.run(request)
        if out is None:
            return []
        return [Image.fromarray(pixels.numpy()) for _, _, _, _, pixels in out["images"]]

