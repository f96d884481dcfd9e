"""What an engine is (fixed for its life) and what one request asks for, checked in one place.

`EngineConfig` names the model, dtype, load format, quantization, parallel layout and device;
`SamplingParams` one request's prompt, size, steps, guidance, seed and image count. The CLI, the
Python API and the server all validate through `EngineConfig.resolve` and
`SamplingParams.resolve`, before any worker starts or any file is written, and every error names
the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

from ..config import ConfigError, ParallelConfig
from ..quantization import QUANTIZATION_METHODS as QUANTIZATIONS

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")
DEVICES = ("auto", "cuda", "cpu")
DEFAULT_GENERATION = {"diff_infer_steps": 50, "diff_guidance_scale": 5.0, "flow_shift": 3.0, "max_length": 12800}
# torch.Generator.manual_seed accepts this range; every image's seed must fall in it.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class RequestError(ValueError):
    """A request that cannot run. `field` is the SamplingParams field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def default_model_dir() -> str:
    """The small model shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-hunyuan-image3")


def read_generation_config(model_dir: str) -> dict:
    """generation_config.json over the defaults; fields epdiff does not implement are refused."""
    from ..models.hunyuan_image3.config import check_generation_config

    path = os.path.join(model_dir, "generation_config.json")
    out = dict(DEFAULT_GENERATION)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                out.update(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        check_generation_config(out, path)
    return out


def context_length(config, generation: dict) -> int:
    """The longest sequence a request may build: generation_config's max_length, within the
    model's position range."""
    return min(int(generation.get("max_length", config.max_position_embeddings)), config.max_position_embeddings)


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the built-in model
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU (resolve() names the one chosen)
    load_format: str = "safetensors"
    quantization: str | None = None
    device: str = "auto"  # auto: CUDA when there is a GPU for every local rank, CPU when there is none
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_batch_size: int = 4  # images one rank denoises together

    def resolve(self) -> "EngineConfig":
        """Fills the model path, the device and the dtype, checks every field against the model.
        Raises ConfigError naming the field and the value."""
        model = default_model_dir() if self.model is None else self.model
        if not os.path.isdir(model):
            raise ConfigError(f"model path {model!r} is not a folder")
        for name, value, allowed in (("dtype", self.dtype, DTYPES), ("load_format", self.load_format, LOAD_FORMATS),
                                     ("device", self.device, DEVICES)):
            if value not in allowed:
                raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization {self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        device = self._pick_device()
        dtype = self.dtype if self.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        resolved = dataclasses.replace(self, model=model, device=device, dtype=dtype)
        info = resolved.model_info
        info.check_layout(resolved.parallel)
        stored = info.stored_quantization
        if stored is not None and resolved.load_format == "safetensors":
            if self.quantization not in (None, stored):
                raise ConfigError(f"quantization {self.quantization!r} was asked for, but {model} is stored "
                                  f"pre-quantized as {stored!r}")
            resolved = dataclasses.replace(resolved, quantization=stored)  # it loads as stored
        return resolved

    def _pick_device(self) -> str:
        from ..distributed.launch import local_world_size

        local = local_world_size(self.parallel.world_size)
        gpus = cuda_device_count()
        if self.device == "cpu":
            return "cpu"
        if self.device == "cuda" and gpus == 0:
            raise ConfigError("device 'cuda' was asked for, but this machine has no CUDA GPU")
        if gpus and gpus < local:
            raise ConfigError(f"the layout needs {local} ranks on this machine, one GPU each, but it has {gpus} "
                              f"GPU{'s' * (gpus != 1)}; use fewer ranks, or --device cpu to run on the CPU")
        return "cuda" if gpus else "cpu"

    @property
    def model_info(self) -> "ModelInfo":
        return model_info(os.path.abspath(default_model_dir() if self.model is None else self.model))


@lru_cache(maxsize=8)
def model_info(model_dir: str) -> "ModelInfo":
    return ModelInfo(model_dir)


class ModelInfo:
    """The model folder's configs and tokenizer, read once, for checking requests."""

    def __init__(self, model_dir: str):
        from ..models.hunyuan_image3.config import HunyuanImage3Config
        from ..models.hunyuan_image3.tokenizer import HunyuanTokenizer

        self.model_dir = model_dir
        self.config = HunyuanImage3Config.from_pretrained(model_dir)
        self.generation = read_generation_config(model_dir)
        self.tokenizer = HunyuanTokenizer.from_pretrained(model_dir)
        self.context = context_length(self.config, self.generation)

    @property
    def stored_quantization(self) -> str | None:
        """The method of a pre-quantized checkpoint (config.json's quantization_config), or None."""
        from ..models.hunyuan_image3.weights import checkpoint_quantization

        stored = checkpoint_quantization(self.config, self.model_dir)
        return None if stored is None else stored.name

    def check_layout(self, parallel: ParallelConfig) -> None:
        c = self.config
        parallel.validate(num_experts=c.num_experts, num_layers=c.num_hidden_layers)
        if c.num_key_value_heads % (parallel.tensor_parallel_size * parallel.sequence_parallel_size):
            raise ConfigError(f"num_key_value_heads {c.num_key_value_heads} cannot be split over "
                              f"TP {parallel.tensor_parallel_size} × SP {parallel.sequence_parallel_size}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """One request: images of one prompt. Image k is drawn from seed + k (so each image can be
    regenerated alone from its own seed)."""

    prompt: str
    height: int | None = None  # None: the model's base size; snapped to the nearest aspect bucket
    width: int | None = None
    num_inference_steps: int | None = None  # None: generation_config.json
    guidance_scale: float | None = None  # None: generation_config.json; <= 1: conditional branch only
    seed: int = 0
    n: int = 1

    def image_seed(self, k: int) -> int:
        return self.seed + k

    def resolve(self, engine: EngineConfig) -> "SamplingParams":
        """Defaults filled from the model, every field checked; raises RequestError."""
        from ..sampling.resolution import snap

        info, layout = engine.model_info, engine.parallel
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError("prompt", f"prompt is empty: {self.prompt!r}")
        if not _is_int(self.n) or self.n < 1:
            raise RequestError("n", f"number of images must be a positive integer, got {self.n!r}")
        steps = info.generation["diff_infer_steps"] if self.num_inference_steps is None else self.num_inference_steps
        if not _is_int(steps) or steps < 1:
            raise RequestError("num_inference_steps", f"num_inference_steps must be at least 1, got {steps!r}")
        guidance = info.generation["diff_guidance_scale"] if self.guidance_scale is None else self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise RequestError("guidance_scale", f"guidance_scale must be a finite number, got {guidance!r}")
        if guidance < 0:
            raise RequestError("guidance_scale", f"guidance_scale must be >= 0, got {guidance}")
        if layout.cfg_parallel_size == 2 and guidance <= 1:
            raise RequestError("guidance_scale", f"--cfg-parallel-size 2 runs the two guidance branches on two ranks, "
                                                 f"but guidance scale {guidance} <= 1 has only the conditional branch")
        if not _is_int(self.seed) or self.seed < SEED_MIN or self.image_seed(self.n - 1) > SEED_MAX:
            raise RequestError("seed", f"seed must be an integer with seed .. seed + n - 1 in [{SEED_MIN}, "
                                       f"{SEED_MAX}], got {self.seed!r} with n = {self.n}")
        c = info.config
        height = c.image_base_size if self.height is None else self.height
        width = c.image_base_size if self.width is None else self.width
        try:
            _, height, width = snap(height, width, c.image_base_size, c.vae_factor)
        except ValueError as e:
            raise RequestError("size", str(e)) from None
        grid_h, grid_w = height // c.vae_factor, width // c.vae_factor
        if (grid_h * grid_w) % layout.sequence_parallel_size:
            raise RequestError("size", f"{grid_h * grid_w} image tokens at {height}x{width} cannot be split over "
                                       f"sequence parallel size {layout.sequence_parallel_size}")
        self._check_length(info, grid_h, grid_w)
        return dataclasses.replace(self, height=height, width=width, num_inference_steps=steps,
                                   guidance_scale=float(guidance))

    def _check_length(self, info: ModelInfo, grid_h: int, grid_w: int):
        from ..models.hunyuan_image3.tokenizer import sequence_length

        n = len(info.tokenizer.encode(self.prompt))
        total = sequence_length(n, grid_h, grid_w)
        if total > info.context:
            raise RequestError("prompt", f"prompt is {n} tokens: with {grid_h * grid_w} image tokens the sequence "
                                         f"is {total} tokens, over the model's context of {info.context}")


def prompt_requests(engine: EngineConfig, prompts, *, height=None, width=None, num_inference_steps=None,
                    guidance_scale=None, seed: int = 0, num_images_per_prompt: int = 1) -> list[SamplingParams]:
    """One resolved request per prompt; image k of prompt i is drawn from seed + i·num_images_per_prompt
    + k. Every request is checked before any runs (RequestError names the prompt and the field)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise RequestError("prompt", "no prompt given")
    out = []
    for i, prompt in enumerate(prompts):
        # Prompt 0 is resolved first, so a seed or count of the wrong type is refused there.
        params = SamplingParams(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                                guidance_scale=guidance_scale, seed=seed + i * num_images_per_prompt if i else seed,
                                n=num_images_per_prompt)
        try:
            out.append(params.resolve(engine))
        except RequestError as e:
            raise RequestError(e.field, f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
    return out
