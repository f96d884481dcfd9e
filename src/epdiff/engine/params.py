"""What an engine is (fixed for its life) and what one request asks for, checked in one place.

`EngineConfig` names the model, dtype, load format, quantization, parallel layout and device;
`SamplingParams` one request's prompt, size, steps, guidance, seed and image count. The CLI, the
Python API and the server all validate through `EngineConfig.resolve` and
`SamplingParams.resolve`, before any worker starts or any file is written, and every error names
the field and the value.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from dataclasses import dataclass, field

from ..config import ConfigError, ParallelConfig, check_choices, is_int, option
from ..loader import LOAD_FORMATS
from ..models.base import InputImage, ModelInfo, TextSampling, TextTask, upright_rgb
from ..models.registry import model_info
from ..quantization import QUANTIZATION_METHODS
from ..sampling.scheduler import SOLVERS
from ..sampling.step_cache import CACHE_KINDS, StepCacheConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "cpu")
# torch.Generator.manual_seed accepts this range; every image's seed must fall in it.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Classifier-free guidance scales in use stay far below this; a larger one only overflows.
MAX_GUIDANCE_SCALE = 100.0
# An input image (editing) larger than this many pixels is refused before it is decoded whole.
MAX_INPUT_PIXELS = 4096 * 4096
MIN_INPUT_SIDE = 16
# Previews a request may ask for while it is denoised (OpenAI's partial_images: 0 to 3).
MAX_PARTIAL_IMAGES = 3


def load_input_image(value, index: int):
    """A request's input image k, checked: a PIL image (as an RGB copy), a file path or the file's
    bytes (as an InputImage: decoded once here to check it, then kept as the file); RequestError("image",
    ...) names the image and the problem."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {index}"
    if isinstance(value, InputImage):  # checked already (a request resolved a second time)
        return value
    if isinstance(value, str | os.PathLike) and os.path.isfile(value):
        with open(value, "rb") as f:
            value = f.read()
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, str, os.PathLike)):
        source = io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value
        if not isinstance(value, (bytes, bytearray)) and not os.path.isfile(value):
            raise RequestError("image", f"{what}: no file {os.fspath(value)!r}")
        try:
            image = Image.open(source)
        except Image.DecompressionBombError as e:
            raise RequestError("image", f"{what} is over the {MAX_INPUT_PIXELS} pixels an input image may have "
                                        f"({str(e)[:120]})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise RequestError("image", f"{what} is not an image Pillow can read ({type(e).__name__}: "
                                        f"{str(e)[:120]})") from None
    else:
        raise RequestError("image", f"{what} must be a PIL image, a file path or the file's bytes, got "
                                    f"{type(value).__name__}")
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise RequestError("image", f"{what} is {width}x{height}: over the {MAX_INPUT_PIXELS} pixels an input image "
                                    "may have")
    if min(width, height) < MIN_INPUT_SIDE:
        raise RequestError("image", f"{what} is {width}x{height}: each side must be at least {MIN_INPUT_SIDE} pixels")
    try:
        rgb = upright_rgb(image)
    except Exception as e:  # noqa: BLE001 - a truncated file or bad EXIF raises Pillow's many kinds
        raise RequestError("image", f"{what} ({image.mode}, {width}x{height}) cannot be decoded as RGB: "
                                    f"{str(e)[:120]}") from None
    return rgb if isinstance(value, Image.Image) else InputImage(bytes(value), rgb.size)


def _check_text(field: str, text: str) -> None:
    """A text field must encode as UTF-8 (a JSON string may carry a lone surrogate, which the
    tokenizer cannot take)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, f"{field} is not valid text: character {e.start} is a lone surrogate "
                                  f"({text[e.start]!r})") from None


class RequestError(ValueError):
    """A request that cannot run. `field` is the SamplingParams field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def default_model_dir() -> str:
    """The small model shipped inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tiny-hunyuan-image3")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = option(None, "model folder (default: the small model shipped with epdiff)")
    dtype: str = option("auto", "auto: bfloat16 on GPU, float32 on CPU (resolve() names the one chosen)",
                        choices=DTYPES)
    load_format: str = option("safetensors", "dummy: random weights of the real shapes, made on the device "
                                             "(for benchmarks)", choices=LOAD_FORMATS)
    quantization: str | None = option(None, "fp8: routed experts in float8 with per-channel scales (quantized "
                                            "while loading)", choices=tuple(QUANTIZATION_METHODS))
    device: str = option("auto", "auto: CUDA when there is a GPU for every local rank, CPU when there is none",
                         choices=DEVICES)
    max_batch_size: int = option(4, "images one rank denoises together")
    cache: str = option("none", "step caching, for requests that do not choose: taylor skips the model on "
                                "most steps and extrapolates its prediction; fbcache skips all blocks but the "
                                "first where that block's output barely changed (README, 'Step caching')",
                        choices=CACHE_KINDS)
    cache_interval: int = option(StepCacheConfig.interval, "taylor: a full step at least every this many steps")
    cache_order: int = option(StepCacheConfig.order, "taylor: the order of the extrapolation")
    cache_threshold: float = option(StepCacheConfig.threshold, "fbcache: skip the other blocks when the first "
                                                               "block's output changed by less than this (relative)")
    enforce_eager: bool = option(False, "no CUDA graphs: on one GPU a text pass's one-token step, a text "
                                        "prefix's prefill (per 64-token length) and Nucleus-Image's denoising "
                                        "step are otherwise captured once and replayed")
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """The engine's and the layout's fields as one set of keywords (the Python API's)."""
        engine_fields = {f.name for f in dataclasses.fields(cls)} - {"parallel"}
        parallel_fields = {f.name for f in dataclasses.fields(ParallelConfig)}
        unknown = sorted(set(options) - engine_fields - parallel_fields)
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}; the options are "
                            f"{', '.join(sorted(engine_fields | parallel_fields))}")
        parallel = ParallelConfig(**{k: v for k, v in options.items() if k in parallel_fields})
        return cls(**{k: v for k, v in options.items() if k in engine_fields}, parallel=parallel)

    def as_options(self) -> dict:
        """The inverse of from_options."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "parallel"}
        return {**options, **dataclasses.asdict(self.parallel)}

    def resolve(self) -> "EngineConfig":
        """Fills the model path, the device and the dtype, checks every field against the model.
        Raises ConfigError naming the field and the value."""
        model = default_model_dir() if self.model is None else self.model
        if not os.path.isdir(model):
            raise ConfigError(f"model path {model!r} is not a folder")
        check_choices(self)
        if not is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be a positive integer, got {self.max_batch_size!r}")
        try:
            self.default_cache.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
    def default_cache(self) -> StepCacheConfig:
        """The step caching of a request that does not choose its own."""
        return StepCacheConfig(self.cache, self.cache_interval, self.cache_order, threshold=self.cache_threshold)

    @property
    def model_info(self) -> ModelInfo:
        """The model folder read by its family (once per process)."""
        return model_info(os.path.abspath(default_model_dir() if self.model is None else self.model))


def _shown(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


@dataclass(frozen=True)
class SamplingParams:
    """One request: images of one prompt. Image k is drawn from seed + k (so each image can be
    regenerated alone from its own seed)."""

    prompt: str
    height: int | None = None  # None: the model's default size; the family resolves it (ModelInfo.resolve_size)
    width: int | None = None
    num_inference_steps: int | None = None  # None: generation_config.json
    guidance_scale: float | None = None  # None: generation_config.json; <= 1: conditional branch only
    seed: int = 0
    n: int = 1
    cache: StepCacheConfig | str | None = None  # None: the engine's; a kind name: that kind, default settings
    solver: str | None = None  # None: the model's default (ModelInfo.solvers[0])
    system_prompt: str | None = None  # None: the model's default; a name the family knows, or the text itself
    images: tuple | list | None = None  # an edit's input images (PIL images, paths or bytes); None: text to image
    # What the model does before drawing: "image" (nothing), or one of the family's text passes
    # (ModelInfo.text_tasks: HunyuanImage-3.0-Instruct's think, recaption, think_recaption). None:
    # the model's default. A text pass with no size given lets the model choose the aspect ratio.
    task: str | None = None
    max_new_tokens: int | None = None  # the text pass's budget (None: the model's)
    temperature: float | None = None  # the text pass's sampling (None: the model's; 0: greedy)
    top_k: int | None = None
    top_p: float | None = None
    # The text the image is drawn from, for a model that writes before it draws: given, no text
    # pass runs; None: the text pass (if any) writes it.
    cot_text: str | None = None
    partial_images: int = 0  # previews of each image while it is denoised (0 to MAX_PARTIAL_IMAGES)

    def image_seed(self, k: int) -> int:
        return self.seed + k

    @property
    def writes_first(self) -> bool:
        """A text pass runs before the images (resolved params)."""
        return self.cot_text is None and self.task not in (None, "image")

    def text_task(self, image_token_multiple: int = 1) -> TextTask:
        """The request's text pass (resolved params that write first); its tokens are drawn from the
        request's seed. image_token_multiple: the layout's sequence parallel size."""
        return TextTask(self.prompt, self.seed, self.task, self.height is None,
                        TextSampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p),
                        self.system_prompt, self.images, image_token_multiple)

    def resolve(self, config: EngineConfig) -> "SamplingParams":
        """Defaults filled from the model, every field checked; raises RequestError."""
        info, layout = config.model_info, config.parallel
        if not isinstance(self.prompt, str):
            raise RequestError("prompt", f"prompt must be a string, got {type(self.prompt).__name__} "
                                         f"{_shown(self.prompt)}")
        if not self.prompt.strip():
            raise RequestError("prompt", f"prompt is empty: {self.prompt!r}")
        _check_text("prompt", self.prompt)
        if not is_int(self.n) or self.n < 1:
            raise RequestError("n", f"number of images must be a positive integer, got {self.n!r}")
        steps = info.default_num_inference_steps if self.num_inference_steps is None else self.num_inference_steps
        if not is_int(steps) or steps < 1:
            raise RequestError("num_inference_steps", f"num_inference_steps must be at least 1, got {steps!r}")
        guidance = info.default_guidance_scale if self.guidance_scale is None else self.guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise RequestError("guidance_scale", f"guidance_scale must be a finite number, got {guidance!r}")
        if not 0 <= guidance <= MAX_GUIDANCE_SCALE:
            raise RequestError("guidance_scale", f"guidance_scale must be in [0, {MAX_GUIDANCE_SCALE:g}], got {guidance}")
        if layout.cfg_parallel_size == 2 and info.num_guidance_branches(guidance) < 2:
            raise RequestError("guidance_scale", f"--cfg-parallel-size 2 runs the two guidance branches on two ranks, "
                                                 f"but guidance scale {guidance} needs only the conditional branch")
        if not is_int(self.seed) or self.seed < SEED_MIN or self.image_seed(self.n - 1) > SEED_MAX:
            raise RequestError("seed", f"seed must be an integer with seed .. seed + n - 1 in [{SEED_MIN}, "
                                       f"{SEED_MAX}], got {self.seed!r} with n = {self.n}")
        images = self.images or ()
        if isinstance(images, (str, bytes, bytearray, os.PathLike)) or hasattr(images, "getpixel"):
            images = (images,)  # one image, not wrapped in a list
        elif not isinstance(images, (list, tuple)):
            raise RequestError("image", f"images must be a list of images, got {type(images).__name__}")
        images = tuple(images)
        if images and not info.max_input_images:
            raise RequestError("image", f"the model cannot edit images ({info.no_edit_reason}); got {len(images)} "
                                        "input image(s)")
        if len(images) > info.max_input_images:
            raise RequestError("image", f"{len(images)} input images: the model takes at most {info.max_input_images}")
        images = tuple(load_input_image(image, k) for k, image in enumerate(images))
        task = info.default_task if self.task is None else self.task
        if task != "image" and task not in info.text_tasks:
            tasks = ", ".join(["image", *info.text_tasks])
            raise RequestError("task", f"unknown task {_shown(task)} for this model; it does: {tasks}")
        if self.cot_text is not None and (not isinstance(self.cot_text, str) or not info.text_tasks):
            raise RequestError("cot_text", f"cot_text is the text a model that writes before drawing draws from: "
                                           f"{'this model writes none' if not info.text_tasks else 'give a string'}"
                                           f", got {_shown(self.cot_text)}")
        if self.cot_text is not None:
            _check_text("cot_text", self.cot_text)
        writes = task != "image" and self.cot_text is None
        chooses_size = writes and self.height is None and self.width is None  # the model's choice, as the reference's "auto"
        if chooses_size:
            height = width = None
        else:
            default = info.edit_size(images) if images and None in (self.height, self.width) else info.default_size
            height = default[0] if self.height is None else self.height
            width = default[1] if self.width is None else self.width
            try:
                height, width = info.resolve_size(height, width)
            except ValueError as e:
                raise RequestError("size", str(e)) from None
            tokens = info.image_tokens(height, width)
            if tokens % layout.sequence_parallel_size:
                raise RequestError("size", f"{tokens} image tokens at {height}x{width} cannot be split over "
                                           f"sequence parallel size {layout.sequence_parallel_size}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise RequestError("system_prompt", f"system_prompt must be a string, got {_shown(self.system_prompt)}")
        if self.system_prompt is not None:
            _check_text("system_prompt", self.system_prompt)
        try:
            system_prompt = info.resolve_system_prompt(self.system_prompt, task)
        except ValueError as e:
            raise RequestError("system_prompt", str(e)) from None
        sampling = self._text_sampling(info)  # checked whether or not a text pass runs
        if not is_int(self.partial_images) or not 0 <= self.partial_images <= MAX_PARTIAL_IMAGES:
            raise RequestError("partial_images", f"partial_images must be an integer from 0 to {MAX_PARTIAL_IMAGES}, "
                                                 f"got {_shown(self.partial_images)}")
        try:
            if writes:
                info.check_text_pass(TextTask(self.prompt, self.seed, task, chooses_size, sampling, system_prompt,
                                              images), None if chooses_size else info.image_tokens(height, width))
            if height is not None:
                info.check_prompt(self.prompt, height, width, system_prompt, images, self.cot_text or "")
        except ValueError as e:
            raise RequestError("prompt", str(e)) from None
        cache = config.default_cache if self.cache is None else self.cache
        try:
            cache = (StepCacheConfig(cache) if isinstance(cache, str) else cache).check()
        except (TypeError, ValueError, AttributeError) as e:
            raise RequestError("cache", str(e) if isinstance(e, ValueError) else
                               f"cache must be a kind name or a StepCacheConfig, got {_shown(cache)}") from None
        if cache.kind == "fbcache" and not info.supports_block_cache:
            raise RequestError("cache", f"cache 'fbcache' needs the model's blocks; the {info.family.name} family "
                                        "does not run them through it (use 'taylor')")
        solver = info.solvers[0] if self.solver is None else self.solver
        if solver not in info.solvers:
            raise RequestError("solver", f"unknown solver {_shown(solver)} for the {info.family.name} family; choose "
                                         f"one of {', '.join(info.solvers)}")
        if SOLVERS[solver].stages > 1 and cache.enabled:
            if self.cache is None:  # the engine's default cache: a multi-call solver runs without it
                cache = StepCacheConfig()
            else:
                raise RequestError("cache", f"cache {cache.kind!r} works with one-call solvers only (euler), not "
                                            f"{solver!r} ({SOLVERS[solver].stages} model calls a step)")
        return dataclasses.replace(self, height=height, width=width, num_inference_steps=steps,
                                   guidance_scale=float(guidance), cache=cache, solver=solver,
                                   system_prompt=system_prompt, images=images, task=task,
                                   max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                   top_k=sampling.top_k, top_p=sampling.top_p)

    def _text_sampling(self, info: ModelInfo) -> TextSampling:
        """The text pass's budget and sampling: the request's, else the model's; RequestError names
        a bad one."""
        default = info.default_text_sampling
        budget = default.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens
        if not is_int(budget) or budget < 1:
            raise RequestError("max_new_tokens", f"max_new_tokens must be a positive integer, got {_shown(budget)}")
        temperature = default.temperature if self.temperature is None else self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise RequestError("temperature", f"temperature must be a number in [0, 2] (0: greedy), got "
                                              f"{_shown(temperature)}")
        top_k = default.top_k if self.top_k is None else self.top_k
        if not is_int(top_k) or top_k < 0:
            raise RequestError("top_k", f"top_k must be a non-negative integer (0: off), got {_shown(top_k)}")
        top_p = default.top_p if self.top_p is None else self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise RequestError("top_p", f"top_p must be a number in (0, 1], got {_shown(top_p)}")
        return TextSampling(int(budget), float(temperature), int(top_k), float(top_p))


def prompt_requests(config: EngineConfig, prompts, *, seed: int = 0, num_images_per_prompt: int = 1,
                    **fields) -> list[SamplingParams]:
    """One resolved request per prompt; image k of prompt i is drawn from seed + i·num_images_per_prompt
    + k. fields: SamplingParams' others (height, steps, guidance, task, ...). Every request is
    checked before any runs (RequestError names the prompt and the field)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise RequestError("prompt", "no prompt given")
    out = []
    for i, prompt in enumerate(prompts):
        # Prompt 0 is resolved first, so a seed or count of the wrong type is refused there.
        params = SamplingParams(prompt, seed=seed + i * num_images_per_prompt if i else seed,
                                n=num_images_per_prompt, **fields)
        try:
            out.append(params.resolve(config))
        except RequestError as e:
            raise RequestError(e.field, f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
    return out
