"""The denoising loop, once for every model family (docs/architecture.md, 'The engine').

Every rank runs it in lockstep on its DP group's images: the family's pipeline starts the batch
(conditioning, noise, scheduler) and predicts each step's velocities for this rank's guidance
branches; the loop exchanges the branches between CFG ranks, combines them, steps the scheduler,
tracks non-finite latents on the device (read once, after the loop: no host sync in a step),
times the steps, reports progress, and decodes on the decode ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ..distributed.collectives import all_gather_tensor
from ..distributed.parallel_state import ParallelState
from ..models.base import ImagePipeline, ImageTask
from ..moe.layer import moe_layers, reset_token_counts


class BatchCancelled(Exception):
    """Every rank stopped the batch after `step` steps (its requests were all abandoned)."""

    def __init__(self, step: int):
        super().__init__(f"the batch was cancelled after step {step}")
        self.step = step


@dataclass
class DenoisedImage:
    task: ImageTask
    latents: torch.Tensor  # [C, h, w] fp32, on the CPU
    nonfinite_step: int | None  # the first step whose latents held a NaN or inf
    pixels: torch.Tensor | None = None  # uint8 [H, W, 3] on decode ranks
    full_steps: int = 0  # the steps that ran the whole model (step caching skips some)


@dataclass
class RankMetrics:
    rank: int
    layout: str
    local_experts: list[int] = field(default_factory=list)
    parameter_bytes: int = 0
    checkpoint_bytes_read: int = 0
    load_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)  # the last batch's
    peak_memory_bytes: int | None = None

    @classmethod
    def of(cls, pipe: ImagePipeline, parallel: ParallelState, load_seconds: float) -> "RankMetrics":
        moe = moe_layers(pipe.transformer)
        return cls(rank=parallel.global_rank, layout=parallel.config.describe(),
                   local_experts=moe[0].local_expert_ids if moe else [],
                   parameter_bytes=sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()),
                   checkpoint_bytes_read=pipe.checkpoint_bytes_read, load_seconds=load_seconds)


def is_decode_rank(parallel: ParallelState) -> bool:
    """One rank per DP group decodes and reports its group's images."""
    return parallel.tp.rank == 0 and parallel.sp.rank == 0 and parallel.cfg.rank == 0 and parallel.pp.rank == 0


def preview_steps(num_steps: int, count: int) -> list[int]:
    """The steps after which an image asking for `count` previews gets them: evenly spread, never
    after the last step (fewer than count where the steps are fewer)."""
    return sorted({s for j in range(1, count + 1) if 0 < (s := round(j * num_steps / (count + 1))) < num_steps})


@torch.inference_mode()
def denoise(pipe: ImagePipeline, tasks: Sequence[ImageTask], parallel: ParallelState, metrics: RankMetrics,
            on_step: Callable[[int, int], None] | None = None, show_progress: bool = False,
            decode: Sequence[bool] | None = None, should_stop: Callable[[int], bool] | None = None,
            previews: tuple[set, Callable] | None = None) -> list[DenoisedImage]:
    """Denoises images that share size, steps and guidance (their prompts may differ) and, where
    the pipeline can, decodes those with decode[k] (default: all). Fills metrics' step times and
    peak memory. should_stop(steps done), asked on every rank after every step but the last, must
    answer alike on every rank (the worker's is rank 0's answer, broadcast); True raises
    BatchCancelled there.

    previews (steps, on_preview): after each of those steps (the same on every rank), every rank
    calls on_preview(step, [(k, preview index, uint8 pixels)]) with the decode rank's previews of
    the images asking for one then (ImageTask.partial_images; preview_steps): the decoded estimate
    of the clean latents, x − σ·v (flow matching), from the step's last model call."""
    first, device = tasks[0], parallel.device
    n = len(tasks)
    num_branches = pipe.info.num_guidance_branches(first.guidance_scale)
    branches = list(range(num_branches))
    if parallel.cfg.size == 2:
        branches = [branches[parallel.cfg.rank]]
    reset_token_counts(pipe.transformer)  # a new batch's token layout
    block_cache = first.cache.block_cache(first.num_inference_steps, parallel.world)
    batch = pipe.start_batch(tasks, branches, block_cache)
    latents, scheduler = batch.latents, batch.scheduler
    # The first step whose latents are not finite, per image: kept on the device and read once
    # after the loop, so checking costs no host sync inside a step.
    nonfinite_step = torch.full((n,), -1, dtype=torch.long, device=device)
    timer = StepTimer(device)
    steps = tqdm(range(len(scheduler)), desc=f"{n} image{'s' * (n > 1)}: {first.prompt[:30]}", leave=False,
                 disable=not (show_progress and parallel.global_rank == 0))
    # Step caching: the same schedule on every rank (it depends on the settings alone), so a
    # skipped step makes no model call and no collective anywhere.
    full_steps, series = first.cache.full_steps(len(scheduler)), first.cache.extrapolator()
    # Progress, timings, cancellation and counts are in steps; a multi-stage solver's step is
    # several model calls (a step cache runs with one-call solvers only).
    stages = getattr(scheduler, "calls_per_step", 1)
    num_steps = len(scheduler) // stages
    gather_at, on_preview = previews if previews is not None else (set(), None)
    wanted = [preview_steps(num_steps, task.partial_images) for task in tasks]
    for i in steps:
        if i % stages == 0:
            timer.start()
        if full_steps[i]:
            if block_cache is not None:
                block_cache.begin_step(i)
            velocity = batch.predict(latents, i)
            if parallel.cfg.size == 2:
                velocity = torch.cat(all_gather_tensor(velocity, parallel.cfg).unbind(0))  # [cond; uncond]
            if num_branches == 2:
                cond_v, uncond_v = velocity.chunk(2)
                velocity = pipe.combine_guidance(cond_v, uncond_v, first.guidance_scale)
            if series is not None:
                series.record(i, velocity)
        else:
            velocity = series.predict(i)
        step, estimate = (i + 1) // stages, None
        if (i + 1) % stages == 0 and step in gather_at and pipe.can_decode:
            estimate = latents.float() - scheduler.sigma(i) * velocity.float()  # the clean latents, estimated
        latents = scheduler.step(velocity, latents, i)
        finite = torch.isfinite(latents).flatten(1).all(1)
        nonfinite_step = torch.where((nonfinite_step < 0) & ~finite, i // stages, nonfinite_step)
        if (i + 1) % stages:
            continue
        timer.stop()
        if step in gather_at:  # previews are decoded outside the step's time
            rows = [(k, wanted[k].index(step)) for k in range(n)
                    if step in wanted[k] and (decode is None or decode[k])] if estimate is not None else []
            on_preview(step, [(k, index, pipe.decode(estimate[k:k + 1].cpu())[0]) for k, index in rows])
        if on_step is not None:
            on_step(step, num_steps)
        if should_stop is not None and step < num_steps and should_stop(step):
            metrics.step_seconds = timer.seconds()
            raise BatchCancelled(step)
    metrics.step_seconds = timer.seconds()  # this batch's
    bad = nonfinite_step.tolist()
    latents = latents.float().cpu()
    ran = block_cache.full_steps if block_cache is not None else sum(full_steps) // stages
    out = [DenoisedImage(task, latents[k], bad[k] if bad[k] >= 0 else None, full_steps=ran)
           for k, task in enumerate(tasks)]
    if pipe.can_decode:
        for k, image in enumerate(out):
            if image.nonfinite_step is None and (decode is None or decode[k]):
                image.pixels = pipe.decode(image.latents[None])[0]
    if device.type == "cuda":
        metrics.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return out


class StepTimer:
    """Seconds per step without synchronising between steps: CUDA events on a GPU (read once,
    after the loop), the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self):
        self.marks.append([self._mark()])

    def stop(self):
        self.marks[-1].append(self._mark())

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]
