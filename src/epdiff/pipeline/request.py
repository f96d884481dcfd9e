"""What a user asks for, checked before any worker, GPU or file is touched."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..config import ConfigError, ParallelConfig
from .resolution import snap

DEFAULT_GENERATION = {"diff_infer_steps": 50, "diff_guidance_scale": 5.0, "flow_shift": 3.0, "max_length": 12800}


def default_model_dir() -> str:
    """The small model shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-hunyuan-image3")


def context_length(config, generation: dict) -> int:
    """The longest sequence a request may build: generation_config's max_length, within the
    model's position range."""
    return min(int(generation.get("max_length", config.max_position_embeddings)), config.max_position_embeddings)


def read_generation_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    out = dict(DEFAULT_GENERATION)
    if os.path.isfile(path):
        with open(path) as f:
            out.update(json.load(f))
    return out


@dataclass
class GenerationRequest:
    prompts: list[str]
    model: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    num_images_per_prompt: int = 1
    dtype: str = "auto"
    load_format: str = "safetensors"
    output: str | None = None
    save_latents: str | None = None
    metrics_json: str | None = None
    show_progress: bool = True
    decode: bool = True  # False: latents only (no VAE, no pixels)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parallel"] = asdict(self.parallel)
        return d

    def resolve(self) -> "GenerationRequest":
        """Fills defaults from the model folder and checks everything; raises ValueError naming the value."""
        from ..models.hunyuan_image3.config import HunyuanImage3Config

        if self.model is None:
            self.model = default_model_dir()
        if not os.path.isdir(self.model):
            raise ValueError(f"model path {self.model!r} is not a folder")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"unknown --load-format {self.load_format!r}; choose safetensors or dummy")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown --dtype {self.dtype!r}; choose auto, float32, bfloat16 or float16")
        if not self.prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(self.prompts):
            if not p or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        if not isinstance(self.num_images_per_prompt, int) or self.num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {self.num_images_per_prompt}")
        config = HunyuanImage3Config.from_pretrained(self.model)
        gen = read_generation_config(self.model)
        self.num_inference_steps = gen["diff_infer_steps"] if self.num_inference_steps is None else self.num_inference_steps
        self.guidance_scale = gen["diff_guidance_scale"] if self.guidance_scale is None else self.guidance_scale
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.parallel.cfg_parallel_size == 2 and self.guidance_scale <= 1:
            raise ConfigError(f"--cfg-parallel-size 2 runs the two guidance branches on two ranks, but guidance "
                              f"scale {self.guidance_scale} <= 1 has only the conditional branch")
        base = config.image_base_size
        self.height = base if self.height is None else self.height
        self.width = base if self.width is None else self.width
        _, self.height, self.width = snap(self.height, self.width, base, config.vae_factor)
        grid = (self.height // config.vae_factor) * (self.width // config.vae_factor)
        if grid % self.parallel.sequence_parallel_size:
            raise ConfigError(f"{grid} image tokens at {self.height}x{self.width} cannot be split over "
                              f"sequence parallel size {self.parallel.sequence_parallel_size}")
        self.parallel.validate(num_experts=config.num_experts, num_layers=config.num_hidden_layers)
        if config.num_key_value_heads % (self.parallel.tensor_parallel_size * self.parallel.sequence_parallel_size):
            raise ConfigError(f"num_key_value_heads {config.num_key_value_heads} cannot be split over "
                              f"TP {self.parallel.tensor_parallel_size} × SP {self.parallel.sequence_parallel_size}")
        self.check_prompt_lengths(config, gen)
        for path in (self.output, self.save_latents, self.metrics_json):
            if path:
                check_writable(path)
        return self


    def check_prompt_lengths(self, config, gen):
        from ..models.hunyuan_image3.tokenizer import HunyuanTokenizer, sequence_length

        tokenizer = HunyuanTokenizer.from_pretrained(self.model)
        context = context_length(config, gen)
        grid_h, grid_w = self.height // config.vae_factor, self.width // config.vae_factor
        for i, prompt in enumerate(self.prompts):
            n = len(tokenizer.encode(prompt))
            if sequence_length(n, grid_h, grid_w) > context:
                raise ValueError(f"prompt {i} is {n} tokens: with {grid_h * grid_w} image tokens the sequence is "
                                 f"{sequence_length(n, grid_h, grid_w)} tokens, over the model's context of {context}")


def check_writable(path: str):
    """Fails now, not after an hour of compute, when an output file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a folder")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write {path!r}: no write permission")
