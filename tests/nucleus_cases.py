"""Worker functions of the Nucleus-Image tests (run on every rank of the test world)."""

from __future__ import annotations

import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.models.base import ImageTask
from epdiff.models.registry import model_info
from epdiff.sampling.step_cache import StepCacheConfig

PROMPTS = ["a small red circle on the left", "a large blue square at the top and a green triangle"]
_reference: dict = {}


def task(prompt_index: int, steps: int = 2, size: int = 64, cache: StepCacheConfig = StepCacheConfig()) -> ImageTask:
    return ImageTask(PROMPTS[prompt_index], seed=3 + prompt_index, height=size, width=size,
                     num_inference_steps=steps, guidance_scale=4.0, cache=cache)


def draw(folder: str, state: ParallelState, tasks, decode: bool = False, quantization=None):
    pipe = model_info(folder).load_pipeline(state, torch.float32, "safetensors", quantization, decode)
    images = denoise(pipe, tasks, state, RankMetrics(rank=state.global_rank, layout=state.config.describe()))
    return pipe, images


def reference(folder: str, prompt_index: int, quantization=None) -> torch.Tensor:
    key = (folder, prompt_index, quantization)
    if key not in _reference:
        _, images = draw(folder, ParallelState.single(), [task(prompt_index)], quantization=quantization)
        _reference[key] = images[0].latents
    return _reference[key]


def layouts_against_one_rank(rank: int, folder: str, configs, quantization=None) -> list[dict]:
    """Each layout's latents against one rank's with the same quantization; with quantization,
    also how far one quantized rank is from one unquantized rank ("quantization_err")."""
    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        prompt_index = state.dp.rank % len(PROMPTS)
        _, images = draw(folder, state, [task(prompt_index)], quantization=quantization)
        out, ref = images[0].latents, reference(folder, prompt_index, quantization)
        plain = reference(folder, prompt_index)
        err = float((out - ref).abs().max())
        rows.append(dict(layout=config.describe(), rank=rank, ep=config.enable_expert_parallel,
                         backend=config.all2all_backend, err=err, scale=float(ref.abs().max()),
                         close=err <= 1e-5 * float(ref.abs().max()),
                         quantization_err=float((ref - plain).norm() / plain.norm())))
    return rows


def checkpoint_bytes(rank: int, folder: str, config) -> dict:
    state = ParallelState.build(config, "cpu")
    pipe = model_info(folder).load_pipeline(state, torch.float32, "safetensors", None, False)
    from epdiff.moe.layer import moe_layers

    return {"bytes_read": pipe.checkpoint_bytes_read, "experts": moe_layers(pipe.transformer)[0].local_expert_ids}


def cached_layouts_against_one_rank(rank: int, folder: str, configs, cache: StepCacheConfig, steps: int) -> list[dict]:
    """With step caching: each layout's latents against one rank's, and the steps on which this rank
    called the model (counted at the pipeline's predict)."""
    def run(state, prompt_index):
        pipe = model_info(folder).load_pipeline(state, torch.float32, "safetensors", None, False)
        start, called = pipe.start_batch, []

        def counting_start(tasks, branches, block_cache=None):
            batch = start(tasks, branches, block_cache)
            predict = batch.predict
            batch.predict = lambda latents, i: (called.append(i), predict(latents, i))[1]
            return batch

        pipe.start_batch = counting_start
        metrics = RankMetrics(rank=state.global_rank, layout=state.config.describe())
        images = denoise(pipe, [task(prompt_index, steps, cache=cache)], state, metrics)
        return images[0].latents, called, images[0].full_steps

    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        prompt_index = state.dp.rank % len(PROMPTS)
        out, called, full_steps = run(state, prompt_index)
        key = ("cached", folder, prompt_index, cache, steps)
        if key not in _reference:
            _reference[key] = run(ParallelState.single(), prompt_index)[0]
        ref = _reference[key]
        err = float((out - ref).abs().max())
        rows.append(dict(layout=config.describe(), rank=rank, called=called, full_steps=full_steps, err=err,
                         scale=float(ref.abs().max()),
                         close=err <= 1e-5 * float(ref.abs().max())))
    return rows
