"""Text to image with HunyuanImage-3.0 on one rank of any parallel layout.

Every rank runs this same program (SPMD). Per prompt: tokenize the cond and uncond branches,
cache the text prefix's K/V, then for each of N flow-matching steps predict the velocity of this
rank's branches, combine them with classifier-free guidance and take an Euler step. The decode
ranks (one per DP group) turn the final latents into images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed.collectives import all_gather_tensor
from ..distributed.parallel_state import ParallelState
from ..models.hunyuan_image3.config import HunyuanImage3Config
from ..models.hunyuan_image3.tokenizer import HunyuanTokenizer
from ..models.hunyuan_image3.vae import AutoencoderKLConv3D, to_uint8
from ..models.hunyuan_image3.weights import load_model, load_vae
from ..loader.safetensors_loader import SafetensorsCheckpoint
from .request import GenerationRequest, context_length, read_generation_config
from .resolution import snap
from .scheduler import FlowMatchEulerScheduler, guidance


def initial_noise(shape, seed: int, device: torch.device) -> torch.Tensor:
    """The reference's draw: randn in bf16 from a generator on the run's device, so a seed gives
    the reference's image; identical on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.bfloat16, device=device)


@dataclass
class GeneratedImage:
    prompt_index: int
    image_index: int
    prompt: str
    latents: torch.Tensor  # [C, h, w] fp32
    pixels: torch.Tensor | None = None  # uint8 [H, W, 3] on decode ranks


@dataclass
class RankMetrics:
    rank: int
    layout: str
    local_experts: list[int] = field(default_factory=list)
    parameter_bytes: int = 0
    checkpoint_bytes_read: int = 0
    load_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int | None = None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class TextToImagePipeline:
    def __init__(self, request: GenerationRequest, parallel: ParallelState):
        start = time.perf_counter()
        self.request, self.parallel = request, parallel
        self.device = parallel.device
        self.dtype = resolve_dtype(request.dtype, self.device)
        self.config = HunyuanImage3Config.from_pretrained(request.model)
        self.generation = read_generation_config(request.model)
        self.tokenizer = HunyuanTokenizer.from_pretrained(request.model)
        self.transformer, checkpoint = load_model(request.model, parallel, self.dtype, self.device,
                                                  request.load_format, self.config)
        self.decodes = parallel.tp.rank == 0 and parallel.sp.rank == 0 and parallel.cfg.rank == 0 and parallel.pp.rank == 0
        self.vae = self._load_vae(checkpoint) if self.decodes and request.decode else None
        moe = self.transformer.moe_layers
        self.metrics = RankMetrics(
            rank=parallel.global_rank, layout=parallel.config.describe(),
            local_experts=moe[0].local_expert_ids if moe else [],
            parameter_bytes=sum(p.numel() * p.element_size() for p in self.transformer.parameters()),
            checkpoint_bytes_read=checkpoint.bytes_read if checkpoint else 0,
            load_seconds=time.perf_counter() - start)

    def _load_vae(self, ckpt: SafetensorsCheckpoint | None) -> AutoencoderKLConv3D:
        # Decoding runs in fp32 on CPU and in the model dtype's wider sibling on GPU (the
        # reference decodes under fp16 autocast with fp32 weights).
        if ckpt is None:  # --load-format dummy
            return AutoencoderKLConv3D(self.config.vae, with_encoder=False).to(self.device).eval()
        return load_vae(ckpt, self.config.vae, self.device)

    # -- the sampling algorithm ------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(self) -> list[GeneratedImage]:
        start = time.perf_counter()
        r, p = self.request, self.parallel
        prompts = list(enumerate(r.prompts))
        # DP: prompt i goes to DP rank i % DP; ranks with fewer prompts repeat one as filler so
        # that every rank of an EP group runs the same number of forward passes.
        per_rank = -(-len(prompts) // p.dp.size)
        mine = prompts[p.dp.rank::p.dp.size]
        mine += [(None, prompts[0][1])] * (per_rank - len(mine))
        results = []
        for prompt_index, prompt in mine:
            latents = self.generate_one(prompt, prompt_index if prompt_index is not None else 0)
            if prompt_index is None:
                continue
            for k in range(r.num_images_per_prompt):
                results.append(GeneratedImage(prompt_index, k, prompt, latents[k]))
        if self.vae is not None:
            for image in results:
                image.pixels = self.decode(image.latents[None])[0]
        self.metrics.total_seconds = time.perf_counter() - start + self.metrics.load_seconds
        if self.device.type == "cuda":
            self.metrics.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        return results

    def generate_one(self, prompt: str, prompt_index: int) -> torch.Tensor:
        r, p, c = self.request, self.parallel, self.config
        ratio, height, width = snap(r.height, r.width, c.image_base_size, c.vae_factor)
        h, w = height // c.vae_factor, width // c.vae_factor
        ids = self.tokenizer.encode(prompt)
        max_length = context_length(c, self.generation)
        cond = self.tokenizer.build_sequence(ids, ratio, h, w, c.image_base_size, max_length)
        uncond = self.tokenizer.build_uncond_sequence(ids, ratio, h, w, c.image_base_size, max_length)
        use_cfg = r.guidance_scale > 1.0
        branches = [cond, uncond] if use_cfg else [cond]
        if p.cfg.size == 2:
            branches = [branches[p.cfg.rank]]
        n = r.num_images_per_prompt
        ts = cond.timestep_index
        prefix = torch.stack([b.input_ids[:ts] for b in branches]).repeat_interleave(n, dim=0)
        caches = self.transformer.prefill(prefix, cond.positions[:ts])
        # Everything a step needs is on the device before the loop: a host-to-device copy
        # inside it would wait for the GPU.
        gen_positions = cond.positions[ts: cond.image_start + cond.image_len].to(self.device)

        scheduler = FlowMatchEulerScheduler(r.num_inference_steps, float(self.generation.get("flow_shift", 3.0)))
        latents = initial_noise((n, c.latent_channels, h, w), r.seed + prompt_index, self.device)
        timesteps = scheduler.timesteps.to(self.device)
        steps = tqdm(range(len(scheduler)), desc=f"prompt {prompt_index}", leave=False,
                     disable=not (r.show_progress and p.global_rank == 0))
        timer = StepTimer(self.device)
        for i in steps:
            timer.start()
            t = timesteps[i].expand(n * len(branches))
            model_in = latents.repeat(len(branches), 1, 1, 1)
            velocity = self.transformer(model_in, t, gen_positions, caches).float()
            if p.cfg.size == 2:
                velocity = torch.cat(all_gather_tensor(velocity, p.cfg).unbind(0))  # [cond; uncond]
            if use_cfg:
                cond_v, uncond_v = velocity.chunk(2)
                velocity = guidance(cond_v, uncond_v, r.guidance_scale)
            latents = scheduler.step(velocity, latents, i)
            timer.stop()
        self.metrics.step_seconds += timer.seconds()
        return latents.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
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


def gather_to_rank0(obj):
    """Every rank's object on global rank 0 (a list by rank), None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
