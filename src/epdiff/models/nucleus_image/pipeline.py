"""Text to image with Nucleus-Image on one rank of any parallel layout: the family's part of the
engine's denoising loop (models/base.py).

The standard parts are diffusers' and transformers' own: the pipeline's prompt encoding (its
system prompt and chat template, the Qwen3-VL text encoder's hidden state it picks, padding and
mask), its noise draw and latent packing, its flow-matching scheduler with the resolution-dependent
shift, and its VAE decode, all through a diffusers `NucleusMoEImagePipeline` that holds only the
text encoder, the processor and (on decode ranks) the VAE. The transformer is epdiff's.

The text encoder runs on one rank of each DP group (the first of its replica group, which also
decodes), once per batch for every prompt and the negative one; its states go to the group's other
ranks in one broadcast, and every stage projects them into its blocks' text keys and values once.
"""

from __future__ import annotations

import numpy as np
import torch

from ...distributed.collectives import broadcast_from_first
from ...distributed.parallel_state import ParallelState
from ...kernels.graphs import CudaGraphStep
from ...loader import LOAD_FORMATS
from ...loader.dummy import init_dummy_weights
from ...loader.safetensors_loader import SafetensorsCheckpoint
from ...quantization import get_quantization_config
from ..base import DenoisingBatch, ImagePipeline
from .model import NucleusImageTransformer
from .weights import WEIGHTS_NAME, load_checkpoint


def load_transformer(info, parallel: ParallelState, dtype, device, load_format: str = "safetensors",
                     quantization: str | None = None):
    """This rank's part of the transformer (its experts, its stage's blocks, its TP shards), filled
    from transformer/ or, with load_format='dummy', with random weights made on the device.
    Returns (model, the checkpoint or None)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    checkpoint = SafetensorsCheckpoint(info.component("transformer"), WEIGHTS_NAME) if load_format == "safetensors" \
        else None
    with torch.device(device):
        model = NucleusImageTransformer(info.config, parallel, dtype, device, get_quantization_config(quantization))
    if checkpoint is None:
        init_dummy_weights(model)
    else:
        load_checkpoint(model, checkpoint)
    return model.eval(), checkpoint


class FlowMatchSteps:
    """diffusers' FlowMatchEulerDiscreteScheduler as the engine's Scheduler: step i by index."""

    def __init__(self, scheduler, num_inference_steps: int, image_seq_len: int, device):
        from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import calculate_shift, retrieve_timesteps

        c = scheduler.config
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        self.timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        self.scheduler = scheduler

    def __len__(self) -> int:
        return len(self.timesteps)

    def sigma(self, i: int) -> torch.Tensor:
        """What the transformer sees as its timestep: t / num_train_timesteps."""
        return self.timesteps[i] / self.scheduler.config.num_train_timesteps

    def step(self, velocity: torch.Tensor, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        return self.scheduler.step(velocity, self.timesteps[step_index], sample, return_dict=False)[0]


class NucleusImagePipeline(ImagePipeline):
    def __init__(self, info, parallel: ParallelState, dtype: torch.dtype, load_format: str = "safetensors",
                 quantization: str | None = None, decode: bool = True):
        import diffusers
        import transformers
        from diffusers import AutoencoderKLQwenImage, NucleusMoEImagePipeline
        from transformers import Qwen3VLForConditionalGeneration

        # Their loading progress bars and advice (install accelerate) would run through every
        # rank's output; load errors still raise.
        transformers.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        diffusers.logging.set_verbosity_error()

        self.info, self.parallel, self.device, self.dtype = info, parallel, parallel.device, dtype
        self.config = info.config
        self.transformer, checkpoint = load_transformer(info, parallel, dtype, self.device, load_format, quantization)
        self.checkpoint_bytes_read = checkpoint.bytes_read if checkpoint else 0
        self.encodes = parallel.replica.rank == 0
        text_encoder = vae = None
        if load_format == "dummy":  # random weights of the folder's sizes
            if self.encodes:
                text_encoder = Qwen3VLForConditionalGeneration._from_config(info.text_encoder_config, dtype=dtype)
            vae = AutoencoderKLQwenImage.from_config(info.vae_config).to(dtype) if decode else None
        else:
            if self.encodes:
                text_encoder = Qwen3VLForConditionalGeneration.from_pretrained(info.component("text_encoder"),
                                                                               dtype=dtype)
            vae = AutoencoderKLQwenImage.from_pretrained(info.component("vae"), torch_dtype=dtype) if decode else None
        if text_encoder is not None:
            text_encoder.to(self.device).eval()
        self.parts = NucleusMoEImagePipeline(transformer=None, scheduler=None, vae=vae, text_encoder=text_encoder,
                                             processor=info.tokenizer)
        if vae is not None:
            vae.to(self.device).eval()
        self.vae = vae
        self.can_decode = vae is not None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [int(i) for i, block in self.transformer.transformer_blocks.items() if block.is_moe]

    def _encode_rows(self, rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's states of each row's prompt [R, L, D], padded to the longest, and
        the mask [R, L] (False at padding). Each distinct prompt is encoded once; padding at the
        end changes no real token's state (the text encoder is causal), as diffusers pads a batch."""
        prompts = list(dict.fromkeys(rows))
        embeds, mask = self.parts.encode_prompt(prompt=prompts, device=self.device)
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        longest = max(lengths)
        text = torch.zeros(len(rows), longest, embeds.shape[-1], dtype=self.dtype, device=self.device)
        keep = torch.zeros(len(rows), longest, dtype=torch.bool, device=self.device)
        for r, prompt in enumerate(rows):
            k = prompts.index(prompt)
            text[r, :lengths[k]], keep[r, :lengths[k]] = embeds[k, :lengths[k]], True
        return text, keep

    def start_batch(self, tasks, branches, block_cache=None) -> DenoisingBatch:
        first = tasks[0]
        grid = self.info.grid(first.height, first.width)
        texts = [[task.prompt for task in tasks], [""] * len(tasks)]  # the negative prompt: diffusers' default
        # Every branch's rows are encoded (another CFG rank of the replica may predict the other branch).
        num_branches = len(texts) if self.parallel.cfg.size > 1 else len(branches)
        every_row = [texts[branch][k] for branch in range(num_branches) for k in range(len(tasks))]
        text, mask = self._encode_rows(every_row) if self.encodes else (None, None)
        replica = self.parallel.replica
        text = broadcast_from_first(text, replica, self.dtype, self.device)
        mask = broadcast_from_first(mask, replica, torch.bool, self.device)
        rows = torch.tensor([branch * len(tasks) + k for branch in branches for k in range(len(tasks))])
        text, mask = text[rows.to(self.device)], mask[rows.to(self.device)]
        cache = self.transformer.encode_text(text, None if bool(mask.all()) else mask, grid)

        latents = torch.cat([self._noise(task.seed, first.height, first.width) for task in tasks])
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchSteps(FlowMatchEulerDiscreteScheduler.from_config(self.info.scheduler_config),
                                   first.num_inference_steps, grid[0] * grid[1], self.device)

        def model_step(latents: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return self.transformer(latents, sigma, grid, cache, block_cache)

        # One GPU without a step cache (its decisions are the host's): the step replayed as a CUDA
        # graph, captured at the batch's second step (BENCHMARKS §24).
        step = CudaGraphStep(model_step, block_cache is None and self.replays_graphs())

        def predict(latents: torch.Tensor, i: int) -> torch.Tensor:
            sigma = scheduler.sigma(i).expand(len(rows))
            out = step(latents.flatten(1, 2).repeat(len(branches), 1, 1), sigma)
            return -out.float().view(len(rows), *latents.shape[1:])  # diffusers steps on the negated output

        return DenoisingBatch(latents, scheduler, predict)

    def _noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        """diffusers' draw for one image with a CPU generator of this seed, packed into patches:
        [1, h/p, w/p, C·p²] (diffusers' [1, S, C·p²] with the patch grid kept)."""
        from diffusers.utils.torch_utils import randn_tensor

        p = self.config.patch_size
        h, w = (p * n for n in self.info.grid(height, width))
        channels = self.config.latent_channels
        noise = randn_tensor((1, 1, channels, h, w), generator=torch.Generator("cpu").manual_seed(seed),
                             device=self.device, dtype=self.dtype)
        return self.parts._pack_latents(noise, 1, channels, h, w, p).view(1, h // p, w // p, channels * p * p)

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """diffusers' guidance, then each token's prediction rescaled to the conditional one's norm."""
        combined = uncond + scale * (cond - uncond)
        return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, h/p, w/p, C·p²] -> uint8 [B, H, W, 3], as the diffusers pipeline decodes."""
        parts, vae = self.parts, self.vae
        height, width = (n * self.info.pixels_per_token for n in latents.shape[1:3])
        z = parts._unpack_latents(latents.flatten(1, 2).to(self.device, vae.dtype), height, width,
                                  self.config.patch_size, self.info.vae_scale_factor)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
        image = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        image = parts.image_processor.postprocess(image, output_type="pt")  # [B, 3, H, W] in [0, 1]
        return (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
