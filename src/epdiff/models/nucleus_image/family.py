"""Nucleus-Image as a model family (models/base.py): a diffusers folder whose model_index.json names
NucleusMoEImagePipeline, read once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ...config import ConfigError, ParallelConfig, option, read_json_object
from ..base import FamilyTool, ImagePipeline, ModelFamily, ModelInfo
from .config import NucleusImageConfig

COMPONENTS = ("transformer", "scheduler", "text_encoder", "vae")
# The diffusers pipeline's defaults (NucleusMoEImagePipeline.__call__ and its default_sample_size).
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_SIDE = 50, 4.0, 1024
# Sides in pixels: whole image tokens (the VAE's factor × the patch size: 16 in the release), within
# the RoPE table's 4096 positions per axis.
MIN_SIDE, MAX_SIDE = 64, 4096
# AutoencoderKLQwenImage's default, for a vae/config.json that leaves it out.
DEFAULT_TEMPORAL_DOWNSAMPLE = (False, True, True)
# What /v1/models suggests (WxH): about a megapixel at common aspect ratios; any size the rule
# above allows is taken.
SUGGESTED_SIZES = ("1024x1024", "1152x896", "896x1152", "1216x832", "832x1216", "1344x768", "768x1344", "512x512")
ROPE_POSITIONS = 4096


class NucleusImageInfo(ModelInfo):
    supports_block_cache = True

    def __init__(self, model_dir: str, family: "NucleusImageFamily"):
        from transformers import AutoTokenizer, Qwen3VLConfig

        self.model_dir, self.family = model_dir, family
        index_path = os.path.join(model_dir, "model_index.json")
        index = read_json_object(index_path)
        tokenizer_part = "processor" if "processor" in index else "tokenizer"
        for part in COMPONENTS + (tokenizer_part,):
            if part not in index:
                raise ConfigError(f"{index_path}: no {part!r} entry: a NucleusMoEImagePipeline folder has "
                                  f"{', '.join(COMPONENTS)} and processor")
            if not os.path.isdir(self.component(part)):
                raise ConfigError(f"{index_path} lists {part!r}, but {self.component(part)} is not a folder")
        self.config = NucleusImageConfig.from_pretrained(self.component("transformer"))
        self.scheduler_config = read_json_object(os.path.join(self.component("scheduler"), "scheduler_config.json"))
        if self.scheduler_config.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ConfigError(f"{self.component('scheduler')}/scheduler_config.json: _class_name "
                              f"{self.scheduler_config.get('_class_name')!r}, expected 'FlowMatchEulerDiscreteScheduler'")
        self.vae_config = read_json_object(os.path.join(self.component("vae"), "config.json"))
        # diffusers' rule (NucleusMoEImagePipeline.vae_scale_factor), from the config: every rank
        # knows it, the decode ranks' VAE or not
        self.vae_scale_factor = 2 ** len(self.vae_config.get("temperal_downsample", DEFAULT_TEMPORAL_DOWNSAMPLE))
        self.pixels_per_token = self.vae_scale_factor * self.config.patch_size
        te_path = os.path.join(self.component("text_encoder"), "config.json")
        self.text_encoder_config = Qwen3VLConfig.from_dict(read_json_object(te_path))
        width = self.text_encoder_config.text_config.hidden_size
        if width != self.config.joint_attention_dim:
            raise ConfigError(f"{self.config.source}: joint_attention_dim {self.config.joint_attention_dim} differs "
                              f"from the text encoder's hidden_size {width} ({te_path})")
        self.tokenizer = AutoTokenizer.from_pretrained(self.component(tokenizer_part))
        self.default_num_inference_steps, self.default_guidance_scale = DEFAULT_STEPS, DEFAULT_GUIDANCE
        self.default_size = (DEFAULT_SIDE, DEFAULT_SIDE)

    def component(self, name: str) -> str:
        return os.path.join(self.model_dir, name)

    def check_layout(self, parallel: ParallelConfig) -> None:
        c = self.config
        parallel.validate(num_experts=c.num_experts, num_layers=c.num_layers)
        split = parallel.tensor_parallel_size * parallel.sequence_parallel_size
        if c.kv_heads % split:
            raise ConfigError(f"num_key_value_heads {c.kv_heads} cannot be split over TP "
                              f"{parallel.tensor_parallel_size} × SP {parallel.sequence_parallel_size}")

    def resolve_size(self, height, width):
        for name, side in (("height", height), ("width", width)):
            if not (MIN_SIDE <= side <= MAX_SIDE and side % self.pixels_per_token == 0):
                raise ValueError(f"requested size {height}x{width} (HxW): {name} {side} is not a size Nucleus-Image "
                                 f"draws; give multiples of {self.pixels_per_token} from {MIN_SIDE} to {MAX_SIDE}")
        return int(height), int(width)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Image tokens (rows, columns) of a resolved size."""
        return height // self.pixels_per_token, width // self.pixels_per_token

    def image_tokens(self, height, width):
        h, w = self.grid(height, width)
        return h * w

    def input_tokens(self, prompt, system_prompt="", images=()):
        return len(self.tokenizer(prompt)["input_ids"]), 0

    def check_prompt(self, prompt, height, width, system_prompt="", images=(), cot_text=""):
        h, w = self.grid(height, width)
        n = len(self.tokenizer(prompt)["input_ids"])
        limit = ROPE_POSITIONS - max(h // 2, w // 2) - 256  # the chat template's tokens besides the prompt
        if n > limit:
            raise ValueError(f"prompt is {n} tokens: at {height}x{width} the text may have at most {limit}")

    def describe(self) -> dict:
        return {"family": self.family.name, "image_sizes": list(SUGGESTED_SIZES),
                "image_size_rule": f"any WxH with sides multiples of {self.pixels_per_token} from {MIN_SIDE} to {MAX_SIDE}",
                "default_size": f"{DEFAULT_SIDE}x{DEFAULT_SIDE}",
                "default_num_inference_steps": self.default_num_inference_steps,
                "default_guidance_scale": self.default_guidance_scale}

    def load_pipeline(self, parallel, dtype: torch.dtype, load_format: str, quantization: str | None,
                      decode: bool) -> ImagePipeline:
        from .pipeline import NucleusImagePipeline

        return NucleusImagePipeline(self, parallel, dtype, load_format, quantization, decode)


@dataclass
class TinyModelOptions:
    """`epdiff make-tiny --family nucleus_image`: the small folder's sizes."""

    hidden_size: int = option(64, "transformer width (attention heads × head size)")
    num_layers: int = option(6, "transformer blocks (the first three and the last dense, as the release)")
    num_attention_heads: int = option(4, "attention heads")
    num_key_value_heads: int = option(2, "key/value heads")
    num_experts: int = option(8, "routed experts per MoE block")
    moe_intermediate_dim: int = option(32, "expert width (and the shared expert's)")
    text_hidden_size: int = option(32, "the Qwen3-VL text encoder's width")
    seed: int = option(0, "seed of the random weights")


def _make_tiny(out_dir: str, options: TinyModelOptions) -> str:
    from .make_tiny import make_tiny

    make_tiny(out_dir, **vars(options))
    return f"wrote a tiny Nucleus-Image folder to {out_dir}"


class NucleusImageFamily(ModelFamily):
    name = "nucleus_image"
    tools = {"make-tiny": FamilyTool("write a small model in the release's diffusers layout", TinyModelOptions,
                                     _make_tiny)}

    def read(self, model_dir: str) -> NucleusImageInfo:
        return NucleusImageInfo(model_dir, self)
