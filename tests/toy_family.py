"""A second model family, as small as the seam allows (docs/architecture.md, 'Model families'):
tests register it with one registry entry and run it through the engine, which knows nothing of
either family.

Its "transformer" is one MoE layer over the latent pixels; a prompt conditions it through a scalar
(its length); the velocity of branch b is moe(latents) + (1 - b)·len(prompt)/10.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from epdiff.config import ConfigError
from epdiff.models.base import DenoisingBatch, ImagePipeline, ModelFamily, ModelInfo
from epdiff.models.registry import FamilyEntry
from epdiff.moe.layer import MoELayer
from epdiff.sampling.scheduler import FlowMatchScheduler

ENTRY = FamilyEntry("toy", "toy_family:ToyFamily", architectures=("ToyImageModel",))
CHANNELS, PATCH, EXPERTS = 8, 8, 4


def write_toy_model(folder) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["ToyImageModel"], "num_experts": EXPERTS}, f)
    return str(folder)


class ToyTransformer(nn.Module):
    def __init__(self, parallel):
        super().__init__()
        self.moe = MoELayer(CHANNELS, EXPERTS, 2, 16, parallel)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.moe.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, latents):  # [B, C, h, w] -> same
        tokens = latents.permute(0, 2, 3, 1)
        return self.moe(tokens).permute(0, 3, 1, 2)


class ToyPipeline(ImagePipeline):
    def __init__(self, info, parallel, decode):
        self.info, self.parallel = info, parallel
        self.transformer = ToyTransformer(parallel)
        self.can_decode = decode

    def start_batch(self, tasks, branches, block_cache=None):
        first = tasks[0]
        h, w = first.height // PATCH, first.width // PATCH
        latents = torch.cat([torch.randn(1, CHANNELS, h, w, generator=torch.Generator().manual_seed(t.seed))
                             for t in tasks])
        condition = torch.tensor([len(t.prompt) / 10 for t in tasks])[:, None, None, None]

        def predict(x, i):
            return torch.cat([self.transformer(x) + (1 - b) * condition for b in branches]).float()

        return DenoisingBatch(latents, FlowMatchScheduler(first.num_inference_steps, 1.0), predict)

    def decode(self, latents):
        pixels = (latents[:, :3].clamp(-1, 1) + 1) * 127.5
        return pixels.permute(0, 2, 3, 1).repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2).to(torch.uint8)

    @property
    def moe_layer_ids(self):
        return [0]


class ToyInfo(ModelInfo):
    def __init__(self, model_dir, family):
        self.model_dir, self.family = model_dir, family
        self.default_num_inference_steps, self.default_guidance_scale, self.default_size = 3, 2.0, (32, 32)

    def check_layout(self, parallel):
        parallel.validate(num_experts=EXPERTS, num_layers=1)
        if parallel.tensor_parallel_size > 1 or parallel.sequence_parallel_size > 1:
            raise ConfigError("the toy model runs no TP or SP")

    def resolve_size(self, height, width):
        if height % PATCH or width % PATCH:
            raise ValueError(f"size {height}x{width} is not a multiple of {PATCH}")
        return height, width

    def image_tokens(self, height, width):
        return height * width // PATCH ** 2

    def input_tokens(self, prompt, system_prompt="", images=()):
        return len(prompt), 0  # a character a token

    def check_prompt(self, prompt, height, width, system_prompt="", images=(), cot_text=""):
        if len(prompt) > 60:
            raise ValueError(f"prompt is {len(prompt)} characters, over 60")

    def describe(self):
        return {"family": self.family.name, "image_sizes": ["32x32"]}

    def load_pipeline(self, parallel, dtype, load_format, quantization, decode):
        return ToyPipeline(self, parallel, decode)


class ToyFamily(ModelFamily):
    name = "toy"

    def read(self, model_dir):
        return ToyInfo(model_dir, self)


def expected_latents(prompt: str, seed: int, steps: int, guidance: float, size: int = 32) -> torch.Tensor:
    """The engine's loop written out for one image on one rank."""
    from epdiff.distributed.parallel_state import ParallelState

    model = ToyTransformer(ParallelState.single())
    x = torch.randn(1, CHANNELS, size // PATCH, size // PATCH, generator=torch.Generator().manual_seed(seed))
    scheduler = FlowMatchScheduler(steps, 1.0)
    with torch.inference_mode():
        for i in range(steps):
            cond = model(x) + len(prompt) / 10
            uncond = model(x)
            v = uncond + guidance * (cond - uncond) if guidance > 1 else cond
            x = scheduler.step(v, x, i)
    return x[0]
