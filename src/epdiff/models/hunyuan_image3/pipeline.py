"""Text to image with HunyuanImage-3.0 on one rank of any parallel layout.

Every rank runs this same program (SPMD). The pipeline loads once (`__init__`) and then denoises
batch after batch (`__call__`): tokenize the cond and uncond branches, cache the text prefix's
K/V, then for each of N flow-matching steps predict the velocity of this rank's branches,
combine them with classifier-free guidance and take an Euler step. The decode ranks (one per DP
group) turn the final latents into images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ...distributed.collectives import all_gather_tensor
from ...distributed.parallel_state import ParallelState
from ...loader.safetensors_loader import SafetensorsCheckpoint
from ...sampling.resolution import snap
from ...sampling.scheduler import FlowMatchEulerScheduler, guidance
from .tokenizer import HunyuanTokenizer
from .vae import AutoencoderKLConv3D, to_uint8
from .weights import load_model, load_vae


def initial_noise(seeds: Sequence[int], shape, device: torch.device) -> torch.Tensor:
    """The reference's draw, one generator per image: randn in bf16 from a generator on the run's
    device, so a seed gives the reference's image alone or in any batch, on every rank."""
    out = []
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(seed)
        out.append(torch.randn((1, *shape), generator=g, dtype=torch.bfloat16, device=device))
    return torch.cat(out)


@dataclass
class DenoisedImage:
    item: object  # the engine's WorkItem
    latents: torch.Tensor  # [C, h, w] fp32, on the CPU
    nonfinite_step: int | None  # the first step whose latents held a NaN or inf
    pixels: torch.Tensor | None = None  # uint8 [H, W, 3] on decode ranks


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


class HunyuanImage3Pipeline:
    def __init__(self, engine, parallel: ParallelState, decode: bool = True):
        """engine: a resolved EngineConfig (its dtype named). decode=False skips the VAE (latents only)."""
        start = time.perf_counter()
        self.parallel, self.device = parallel, parallel.device
        self.dtype = getattr(torch, engine.dtype)
        info = engine.model_info
        self.config, self.generation, self.context = info.config, info.generation, info.context
        self.tokenizer = HunyuanTokenizer.from_pretrained(engine.model)
        self.transformer, checkpoint = load_model(engine.model, parallel, self.dtype, self.device,
                                                  engine.load_format, self.config, engine.quantization)
        self.decodes = parallel.tp.rank == 0 and parallel.sp.rank == 0 and parallel.cfg.rank == 0 and parallel.pp.rank == 0
        self.vae = self._load_vae(checkpoint) if self.decodes and decode else None
        moe = self.transformer.moe_layers
        self.metrics = RankMetrics(
            rank=parallel.global_rank, layout=parallel.config.describe(),
            local_experts=moe[0].local_expert_ids if moe else [],
            parameter_bytes=sum(p.numel() * p.element_size() for p in self.transformer.parameters()),
            checkpoint_bytes_read=checkpoint.bytes_read if checkpoint else 0,
            load_seconds=time.perf_counter() - start)

    def _load_vae(self, ckpt: SafetensorsCheckpoint | None) -> AutoencoderKLConv3D:
        if ckpt is None:  # --load-format dummy
            return AutoencoderKLConv3D(self.config.vae, with_encoder=False).to(self.device).eval()
        return load_vae(ckpt, self.config.vae, self.device)

    # -- the sampling algorithm ------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self, items: Sequence, on_step: Callable[[int, int], None] | None = None,
                 show_progress: bool = False) -> list[DenoisedImage]:
        """Denoises a batch of images that share size, steps and guidance (the engine's WorkItems;
        their prompts may differ) and decodes them on decode ranks."""
        first, p, c = items[0], self.parallel, self.config
        ratio, height, width = snap(first.height, first.width, c.image_base_size, c.vae_factor)
        h, w = height // c.vae_factor, width // c.vae_factor
        use_cfg = first.guidance_scale > 1.0
        sequences = {}  # prompt -> (cond, uncond)
        for item in items:
            if item.prompt not in sequences:
                ids = self.tokenizer.encode(item.prompt)
                sequences[item.prompt] = (
                    self.tokenizer.build_sequence(ids, ratio, h, w, c.image_base_size, self.context),
                    self.tokenizer.build_uncond_sequence(ids, ratio, h, w, c.image_base_size, self.context))
        branches = [0, 1] if use_cfg else [0]
        if p.cfg.size == 2:
            branches = [branches[p.cfg.rank]]
        n = len(items)
        # Rows: every image of the first branch, then every image of the second ([cond; uncond]).
        rows = [sequences[item.prompt][branch] for branch in branches for item in items]
        caches, gen_positions = self._prefill(rows)

        scheduler = FlowMatchEulerScheduler(first.num_inference_steps, float(self.generation.get("flow_shift", 3.0)))
        latents = initial_noise([item.seed for item in items], (c.latent_channels, h, w), self.device)
        timesteps = scheduler.timesteps.to(self.device)
        # The first step whose latents are not finite, per image: kept on the device and read
        # once after the loop, so checking costs no host sync inside a step.
        nonfinite_step = torch.full((n,), -1, dtype=torch.long, device=self.device)
        timer = StepTimer(self.device)
        steps = tqdm(range(len(scheduler)), desc=f"{n} image{'s' * (n > 1)}: {first.prompt[:30]}", leave=False,
                     disable=not (show_progress and p.global_rank == 0))
        for i in steps:
            timer.start()
            t = timesteps[i].expand(len(rows))
            model_in = latents.repeat(len(branches), 1, 1, 1)
            velocity = self.transformer(model_in, t, gen_positions, caches).float()
            if p.cfg.size == 2:
                velocity = torch.cat(all_gather_tensor(velocity, p.cfg).unbind(0))  # [cond; uncond]
            if use_cfg:
                cond_v, uncond_v = velocity.chunk(2)
                velocity = guidance(cond_v, uncond_v, first.guidance_scale)
            latents = scheduler.step(velocity, latents, i)
            finite = torch.isfinite(latents).flatten(1).all(1)
            nonfinite_step = torch.where((nonfinite_step < 0) & ~finite, i, nonfinite_step)
            timer.stop()
            if on_step is not None:
                on_step(i + 1, len(scheduler))
        self.metrics.step_seconds = timer.seconds()  # this batch's
        bad = nonfinite_step.tolist()
        latents = latents.float().cpu()
        out = [DenoisedImage(item, latents[k], bad[k] if bad[k] >= 0 else None) for k, item in enumerate(items)]
        if self.vae is not None:
            for image in out:
                if image.nonfinite_step is None and image.item.request_id is not None:
                    image.pixels = self.decode(image.latents[None])[0]
        if self.device.type == "cuda":
            self.metrics.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        return out

    def _prefill(self, rows):
        """Caches the text prefix of every row; returns the caches and the positions of each
        step's <timestep> and image tokens (shared when every row's prompt has one length)."""
        lengths = [seq.timestep_index for seq in rows]
        longest = max(lengths)
        if longest == min(lengths):
            prefix = torch.stack([seq.input_ids[:longest] for seq in rows])
            caches = self.transformer.prefill(prefix, rows[0].positions[:longest])
            first = rows[0]
            return caches, first.positions[longest: first.image_start + first.image_len].to(self.device)
        pad = self.tokenizer.pad if self.tokenizer.pad is not None else self.tokenizer.bos
        prefix = torch.full((len(rows), longest), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), longest, 2), dtype=torch.long)
        for r, seq in enumerate(rows):
            prefix[r, :lengths[r]] = seq.input_ids[:lengths[r]]
            positions[r, :lengths[r]] = seq.positions[:lengths[r]]
        caches = self.transformer.prefill(prefix, positions, lengths)
        gen = torch.stack([seq.positions[seq.timestep_index: seq.image_start + seq.image_len] for seq in rows])
        return caches, gen.to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        # Decoding runs in fp32 on CPU and in the VAE's own dtype on GPU (the reference decodes
        # under fp16 autocast with fp32 weights).
        images = self.vae.decode_latents(latents.to(self.device, next(self.vae.parameters()).dtype))
        return to_uint8(images.float()).cpu()


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
