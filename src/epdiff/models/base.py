"""The model-family seam (docs/architecture.md, 'Model families'): what a family gives the engine.

    ModelFamily      one per family, registered in models/registry.py: reads a model folder
                     (`read` -> ModelInfo), and its tools (make-tiny, train-tiny, quantize)
    ModelInfo        one model folder, read once: checks a layout and a request against the model,
                     describes it (/v1/models), loads its pipeline on a rank
    ImagePipeline    one rank's loaded model: starts a batch of images (conditioning, noise,
                     scheduler) and predicts their velocities; decodes latents into pixels; a
                     model that writes before it draws also starts a text pass (`start_text`)
    DenoisingBatch   what `start_batch` returns: the engine's denoising loop (engine/denoise.py)
                     runs it step by step: CFG exchange and combine, the scheduler step, non-finite
                     tracking, step timing and progress are the loop's, not the family's

    TextTask         one text pass (a model that writes before it draws: HunyuanImage-3.0-Instruct's
                     think and recaption), TextRules its forced tokens and stops, TextBatch what
                     `start_text` returns for the engine's writing loop (engine/write.py)

A family never sees the engine's requests, futures or workers: the loops hand it `ImageTask`s and
`TextTask`s.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from ..config import ParallelConfig
from ..distributed.parallel_state import ParallelState
from ..moe.layer import experts_stay_on_device
from ..sampling.scheduler import guidance
from ..sampling.step_cache import FirstBlockCache, StepCacheConfig


@dataclass(frozen=True)
class ImageTask:
    """One image to draw, as the engine's planner hands it to a family (its request resolved)."""

    prompt: str
    seed: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    cache: StepCacheConfig = field(default=StepCacheConfig(), kw_only=True)  # the loop's, not the family's
    solver: str = field(default="euler", kw_only=True)  # one of the family's ModelInfo.solvers
    system_prompt: str = field(default="", kw_only=True)  # the resolved text ("" none), for a family that takes one
    images: tuple = field(default=(), kw_only=True)  # an edit's input images (RGB PIL images), in order
    cot_text: str = field(default="", kw_only=True)  # what the model wrote before drawing (its text pass)
    partial_images: int = field(default=0, kw_only=True)  # previews to decode while denoising (the loop's)


@dataclass(frozen=True)
class TextSampling:
    """How a text pass picks its tokens: temperature 0 is greedy; top_k 0 and top_p 1 keep every
    token (applied in that order, as transformers' generate does)."""

    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True)
class TextTask:
    """One text pass: the model writes before it draws (ModelInfo.text_tasks names the tasks)."""

    prompt: str
    seed: int
    task: str  # one of the family's ModelInfo.text_tasks
    choose_size: bool  # the pass ends by choosing the image's aspect ratio
    sampling: TextSampling = TextSampling()
    system_prompt: str = ""
    images: tuple = ()
    # The chosen size's image tokens must be a multiple of this (sequence parallelism splits them).
    image_token_multiple: int = 1


@dataclass(frozen=True)
class TextRules:
    """A text pass's forced tokens and stops, per row (the reference's logits processors):
    - a token in `stops` ends the row (it is kept);
    - after writing a key of `forced` (each key once), the row writes its tokens next;
    - after a key of `choose_from`, the next token is the likeliest of its value's tokens;
    - when max_new_tokens run out, the row writes `closing` (then `choose_from` applies) and ends at
      a stop, or ends there when `closing` is empty."""

    stops: frozenset
    forced: dict = field(default_factory=dict)
    choose_from: dict = field(default_factory=dict)
    closing: tuple = ()

    def most_tokens(self, max_new_tokens: int) -> int:
        """The most tokens a row can write: its budget, a forced run in flight, the closing and the
        choice after it."""
        return max_new_tokens + max((len(t) for t in self.forced.values()), default=0) + len(self.closing) + 1


@dataclass(frozen=True)
class InputImage:
    """An input image as its file's bytes, checked and measured (`size`: (width, height) upright),
    decoded to RGB only where a batch uses it: a request waiting in the queue holds its upload
    (a 4096² PNG of one colour is 49 KB), not ~50 MB of pixels per image (a review found edits
    of such files filling a server's memory from its queue)."""

    data: bytes = field(repr=False)
    size: tuple[int, int]

    def rgb(self):
        from PIL import Image

        return upright_rgb(Image.open(io.BytesIO(self.data)))


def rgb_image(image):
    """A PIL image, or an InputImage decoded, as an RGB PIL image."""
    return image.rgb() if isinstance(image, InputImage) else image


def upright_rgb(image):
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


@dataclass
class TextBatch:
    """A text pass started by a family's pipeline: `logits` for each row's first token ([B, vocab],
    fp32, on the ranks that hold the model's last layer; None elsewhere), and `step(tokens)` which
    feeds one token per row ([B] on the device) and returns the next logits (or None).
    `join(tasks, steps)`, where the family lets rows join a pass under way (ModelInfo.text_joins;
    tasks without input images): prefills the tasks' rows after the others, with room for `steps` tokens each,
    and returns their first tokens' logits ([n, vocab], as `logits`); `step` then takes B + n tokens.
    `compact(keep)` (with join) keeps only the rows at positions `keep`, in that order."""

    logits: torch.Tensor | None
    step: Callable[[torch.Tensor], torch.Tensor | None]
    join: Callable[[Sequence["TextTask"], int], torch.Tensor | None] | None = None
    compact: Callable[[Sequence[int]], None] | None = None


class Scheduler(Protocol):
    """A denoising schedule (diffusers' word; sampling/scheduler.py): len() model calls; call i
    takes the latents to the next call's (a multi-stage solver's `calls_per_step` calls make one
    step; without the attribute, one)."""

    def __len__(self) -> int: ...

    def step(self, velocity: torch.Tensor, sample: torch.Tensor, step_index: int) -> torch.Tensor: ...

    def sigma(self, step_index: int) -> torch.Tensor:
        """The noise level call step_index is evaluated at (previews estimate x − σ·v from it)."""


@dataclass
class DenoisingBatch:
    """A batch of images started by a family's pipeline, for the engine's loop to run.

    `predict(latents, i)` returns this rank's guidance branches' velocities for step i, branch
    after branch ([len(branches)·n, ...], fp32); the loop gathers the branches of other CFG
    ranks, combines them (`ImagePipeline.combine_guidance`) and steps the scheduler."""

    latents: torch.Tensor  # [n, ...] the initial noise, on the device
    scheduler: Scheduler
    predict: Callable[[torch.Tensor, int], torch.Tensor]


class ImagePipeline(ABC):
    """One rank's loaded model of a family (loaded once, used for batch after batch)."""

    info: "ModelInfo"
    parallel: ParallelState
    transformer: nn.Module  # this rank's part of the denoiser (its MoE layers, its parameter bytes)
    checkpoint_bytes_read: int = 0
    can_decode: bool = False  # the VAE is loaded here
    use_cuda_graphs: bool = True  # a family may replay its static-shaped steps as CUDA graphs (--enforce-eager: no)

    @abstractmethod
    def start_batch(self, tasks: Sequence[ImageTask], branches: Sequence[int],
                    block_cache: FirstBlockCache | None = None) -> DenoisingBatch:
        """Images that share size, steps and guidance (their prompts may differ). branches: the
        guidance branches this rank predicts (0 = conditional, 1 = unconditional). block_cache:
        the batch's first-block cache, for a family whose ModelInfo.supports_block_cache: its model
        runs its blocks through it (sampling/step_cache.py run_blocks)."""

    def combine_guidance(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return guidance(cond, uncond, scale)

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents [B, ...] (fp32, CPU) -> uint8 pixels [B, H, W, 3] on the CPU."""

    def start_text(self, tasks: Sequence[TextTask], steps: int) -> TextBatch:
        """Prefills the text passes of these rows (room for `steps` tokens a row); a family whose
        ModelInfo.text_tasks is not empty implements it."""
        raise NotImplementedError(f"the {self.info.family.name} family writes no text")

    @property
    def moe_layer_ids(self) -> list[int]:
        """The model's layer index of each MoE layer of `transformer`, in module order."""
        return []

    def replays_graphs(self) -> bool:
        """Whether static-shaped work on this rank may be replayed as CUDA graphs: one GPU (no
        collectives), not --enforce-eager, and experts that keep their row counts on the device."""
        device = self.parallel.device
        return (self.use_cuda_graphs and device.type == "cuda" and self.parallel.config.world_size == 1
                and experts_stay_on_device(self.transformer, device))


class ModelInfo(ABC):
    """One model folder of a family, read once: the engine checks layouts and requests against it."""

    model_dir: str
    family: "ModelFamily"
    default_num_inference_steps: int
    default_guidance_scale: float
    default_size: tuple[int, int]  # (height, width)
    stored_quantization: str | None = None  # the scheme of a pre-quantized checkpoint
    supports_block_cache: bool = False  # its pipeline takes a FirstBlockCache (`fbcache`)
    solvers: tuple[str, ...] = ("euler",)  # sampling/scheduler.py SOLVERS its pipeline runs; the first is the default
    max_input_images: int = 0  # input images a request may give (image editing); 0: the model cannot edit
    no_edit_reason: str = "its family takes no input images"  # why, where max_input_images is 0
    text_tasks: tuple[str, ...] = ()  # what the model can write before it draws (its text passes)
    text_joins: bool = False  # text passes may join a writing batch under way (TextBatch.join), edits' not
    default_task: str = "image"  # a request's task when it names none
    default_text_sampling: TextSampling = TextSampling()

    @abstractmethod
    def check_layout(self, parallel: ParallelConfig) -> None:
        """Raises ConfigError when the layout does not fit the model (ParallelConfig.validate with
        the model's sizes, and whatever else the family splits)."""

    def num_guidance_branches(self, guidance_scale: float) -> int:
        """Model forwards per image and step: 2 with classifier-free guidance, else 1 (also for a
        model with guidance distilled into it, which takes the scale as an input)."""
        return 2 if guidance_scale > 1.0 else 1

    def resolve_system_prompt(self, value: str | None, task: str = "image") -> str:
        """A request's system_prompt (None: the model's default; "": none) as text, for its task;
        ValueError names the problem."""
        if value:
            raise ValueError(f"the {self.family.name} family takes no system prompt")
        return ""

    def text_rules(self, task: TextTask) -> TextRules:
        """The forced tokens and stops of a text pass (a family with text_tasks implements it)."""
        raise NotImplementedError(f"the {self.family.name} family writes no text")

    def finish_text(self, task: TextTask, token_ids: list[int]) -> tuple[str, tuple[int, int] | None, str]:
        """What a text pass wrote -> (the text the image is drawn from, the size it chose or None,
        the image pass's system prompt)."""
        raise NotImplementedError(f"the {self.family.name} family writes no text")

    def detokenize(self, task: TextTask, token_ids: list[int]) -> str:
        """What a text pass has written so far, as text (streamed while it is written)."""
        raise NotImplementedError(f"the {self.family.name} family writes no text")

    def edit_size(self, images) -> tuple[int, int]:
        """The size an edit is made at when the request gives none (height, width)."""
        return self.default_size

    @abstractmethod
    def resolve_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of the requested size is made at; ValueError names the problem."""

    @abstractmethod
    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens of a resolved size (what sequence parallelism splits)."""

    @abstractmethod
    def check_prompt(self, prompt: str, height: int, width: int, system_prompt: str = "", images=(),
                     cot_text: str = "") -> None:
        """ValueError when the prompt (and what the model wrote before drawing) cannot be drawn at
        this size (too long for the context)."""

    def check_text_pass(self, task: TextTask, image_tokens: int | None = None) -> None:
        """ValueError when the text pass, and an image after it (of image_tokens; None: of any size
        the model may choose), cannot fit the context."""
        raise NotImplementedError(f"the {self.family.name} family writes no text")

    @abstractmethod
    def input_tokens(self, prompt: str, system_prompt: str = "", images=()) -> tuple[int, int]:
        """What a request gives the model, in its tokens: (text: the prompt's, image: the input
        images' sections)."""

    @abstractmethod
    def describe(self) -> dict:
        """What GET /v1/models says about the model besides its name and layout."""

    @abstractmethod
    def load_pipeline(self, parallel: ParallelState, dtype: torch.dtype, load_format: str,
                      quantization: str | None, decode: bool) -> ImagePipeline:
        """This rank's part of the model, loaded; decode: load what decodes latents into pixels."""


@dataclass(frozen=True)
class FamilyTool:
    """A command of a family's (`epdiff make-tiny`, `epdiff train-tiny`): run(out_dir, options) with
    options an instance of the dataclass `options` (its fields are the command's flags)."""

    help: str
    options: type
    run: Callable


class ModelFamily(ABC):
    name: str
    tools: dict[str, FamilyTool] = {}

    @abstractmethod
    def read(self, model_dir: str) -> ModelInfo:
        """Reads the folder's configs and tokenizer, refusing every value the family does not implement."""

    def quantize(self, model_dir: str, out_dir: str, quantization: str, device: str = "cpu") -> dict:
        """`epdiff quantize`: a pre-quantized copy of the checkpoint; returns a summary."""
        raise ValueError(f"the {self.name} family has no pre-quantized checkpoint format")
