"""HunyuanImage-3.0 as a model family (models/base.py): what the engine and the command line see."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError, ParallelConfig, option
from ...sampling.scheduler import SOLVERS
from ..base import FamilyTool, ImagePipeline, ModelFamily, ModelInfo, TextRules, TextSampling, TextTask
from .config import HunyuanImage3Config, read_generation_config
from .resolution import INSTRUCT_EXTRA_BUCKETS, resolution_group
from .system_prompts import SystemPrompts
from .tokenizer import (END_RECAPTION, END_THINK, RECAPTION, TEXT_PASS_OPENERS, THINK, CondImageLayout,
                        HunyuanTokenizer, SequenceTemplate, cot_sections)
from .weights import checkpoint_quantization


MAX_INPUT_IMAGES = 4  # an edit's input images (each adds its VAE and ViT tokens to the prefix)
# The reference's text passes (bot_task): what the model writes before it draws.
TEXT_TASKS = ("think", "recaption", "think_recaption")
# The reference's generate_image writes at most this many tokens unless told otherwise.
MAX_NEW_TOKENS = 2048


class HunyuanImage3Info(ModelInfo):
    """A HunyuanImage-3.0 folder: config.json, generation_config.json and the tokenizer, read once."""

    supports_block_cache = True
    solvers = tuple(SOLVERS)

    def __init__(self, model_dir: str, family: "HunyuanImage3Family"):
        self.model_dir, self.family = model_dir, family
        self.config = HunyuanImage3Config.from_pretrained(model_dir)
        self.generation = read_generation_config(model_dir)
        self.tokenizer = HunyuanTokenizer.from_pretrained(model_dir)
        self.system_prompts = SystemPrompts(model_dir, self.generation.use_system_prompt)
        # The longest sequence a request may build: max_length, within the model's position range.
        self.context = min(int(self.generation.max_length), self.config.max_position_embeddings)
        self.resolution = resolution_group(self.config.image_base_size, self.config.vae_factor,
                                           INSTRUCT_EXTRA_BUCKETS if self.supports_images else ())
        self.default_num_inference_steps = self.generation.diff_infer_steps
        self.default_guidance_scale = self.generation.diff_guidance_scale
        self.default_size = (self.config.image_base_size, self.config.image_base_size)
        # Instruct models see input images (their vision tower): editing.
        self.max_input_images = MAX_INPUT_IMAGES if self.supports_images else 0
        stored = checkpoint_quantization(self.config, model_dir)
        self.stored_quantization = None if stored is None else stored.name
        # The Instruct models write before they draw (their lm_head is loaded with them).
        self.text_tasks = TEXT_TASKS if self.generation.sequence_template == "instruct" else ()
        self.text_joins = bool(self.text_tasks)
        task = self.generation.bot_task
        self.default_task = task if task in self.text_tasks else "image"
        self.default_text_sampling = self._text_sampling(self.generation.raw)

    @staticmethod
    def _text_sampling(generation: dict) -> TextSampling:
        """generation_config.json's sampling as transformers' generate reads it (its defaults where a
        key is absent: greedy unless do_sample, top_k 50, top_p 1)."""
        sample = bool(generation.get("do_sample", False))
        return TextSampling(MAX_NEW_TOKENS, float(generation.get("temperature", 1.0)) if sample else 0.0,
                            int(generation.get("top_k", 50) or 0), float(generation.get("top_p", 1.0)))

    def check_layout(self, parallel: ParallelConfig) -> None:
        c = self.config
        parallel.validate(num_experts=c.num_experts, num_layers=c.num_hidden_layers)
        if c.cfg_distilled and parallel.cfg_parallel_size > 1:
            raise ConfigError(f"--cfg-parallel-size {parallel.cfg_parallel_size}: this model has guidance distilled "
                              "into it (cfg_distilled) and runs one branch per image; use the GPUs for data "
                              "parallelism (--data-parallel-size) instead")
        if c.num_key_value_heads % (parallel.tensor_parallel_size * parallel.sequence_parallel_size):
            raise ConfigError(f"num_key_value_heads {c.num_key_value_heads} cannot be split over "
                              f"TP {parallel.tensor_parallel_size} × SP {parallel.sequence_parallel_size}")

    no_edit_reason = "it has no vision encoder (config.json vit_type)"

    @property
    def supports_images(self) -> bool:
        return "vit_type" in self.config.raw

    def edit_size(self, images):
        """The first input image's own aspect bucket (an edit without a text pass; with one, the model
        chooses; the reference asks the model for the ratio in a one-token pass here)."""
        width, height = images[0].size
        return self.resolution.bucket(self.resolution.nearest_index(height, width))

    def num_guidance_branches(self, guidance_scale: float) -> int:
        return 1 if self.config.cfg_distilled else super().num_guidance_branches(guidance_scale)

    def resolve_size(self, height, width):
        sides = [side for bucket in self.resolution.buckets for side in bucket]
        low, high = min(sides) // 2, 2 * max(sides)
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, bool) and isinstance(side, (int, float)) and side > 0 and not low <= side <= high:
                raise ValueError(f"requested size {height}x{width} (HxW): {name} {side} is far from the model's "
                                 f"sizes ({min(sides)} to {max(sides)} pixels a side); give {low} to {high}")
        _, height, width = self.resolution.snap(height, width)
        return height, width

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.vae_factor, width // self.config.vae_factor

    def image_tokens(self, height, width):
        grid_h, grid_w = self._grid(height, width)
        return grid_h * grid_w

    def template(self, system_prompt: str, cot_text: str = "") -> SequenceTemplate:
        """The sequence template of a request with this (resolved) system prompt and what the model
        wrote before drawing."""
        c, kind = self.config, self.generation.sequence_template
        answer = ("<answer>", "</answer>") if kind == "instruct" else ("", "")
        return SequenceTemplate(kind, system_prompt, c.cfg_distilled, c.use_meanflow,
                                cot_sections(cot_text, self.generation.drop_think, answer))

    def resolve_system_prompt(self, value, task="image"):
        return self.system_prompts.for_request(value, task)

    def _cond_layouts(self, images) -> list[CondImageLayout]:
        """Each input image's section as check_prompt counts it (the ViT grid does not change its length)."""
        slots = int(self.config.raw["vit_processor"]["max_num_patches"]) if images else 0
        layouts = []
        for image in images:
            ratio = self.resolution.nearest_index(image.size[1], image.size[0])
            layouts.append(CondImageLayout(ratio, self.resolution.grid(ratio), (1, 1), slots))
        return layouts

    def check_prompt(self, prompt, height, width, system_prompt="", images=(), cot_text=""):
        grid_h, grid_w = self._grid(height, width)
        n = len(self.tokenizer.encode(prompt))
        template = self.template(system_prompt, cot_text)
        total = self.tokenizer.sequence_length(n, grid_h, grid_w, template, self._cond_layouts(images))
        if total > self.context:
            inputs = f" and {len(images)} input image(s)" if images else ""
            written = " and what the model wrote" if cot_text else ""
            raise ValueError(f"prompt is {n} tokens: with {grid_h * grid_w} image tokens{inputs}{written} the "
                             f"sequence is {total} tokens, over the model's context of {self.context}")

    def input_tokens(self, prompt, system_prompt="", images=()):
        return len(self.tokenizer.encode(prompt)), sum(len(layout) for layout in self._cond_layouts(images))

    # -- the text passes (Instruct: think and recaption before drawing) --------------------------

    def check_text_pass(self, task: TextTask, image_tokens: int | None = None) -> None:
        most = image_tokens or max(self.image_tokens(*bucket) for bucket in self.resolution.buckets)
        n = len(self.tokenizer.encode(task.prompt))
        sections = self.tokenizer.sequence_length(n, 1, 1, self.template(task.system_prompt),
                                                  self._cond_layouts(task.images)) - 1
        written = self.text_rules(task).most_tokens(task.sampling.max_new_tokens)
        if sections + written + most > self.context:
            raise ValueError(f"prompt is {n} tokens: with max_new_tokens {task.sampling.max_new_tokens} written before "
                             f"an image of up to {most} tokens the sequence can reach {sections + written + most} "
                             f"tokens, over the model's context of {self.context}; ask for fewer new tokens")

    def text_rules(self, task: TextTask) -> TextRules:
        """The reference's generate_image: think -> recaption when both are asked, the answer and the
        image header forced after the last part when the pass chooses the size, then the likeliest
        ratio token of the model's buckets; otherwise the pass ends at its last part's end."""
        t = self.tokenizer
        think_end, recaption_end = t.token_id(END_THINK), t.token_id(END_RECAPTION)
        forced = {}
        if task.task == "think_recaption":
            forced[think_end] = (t.token_id(RECAPTION),)
        if not task.choose_size:
            stops = {recaption_end} if "recaption" in task.task else {think_end, recaption_end}
            return TextRules(frozenset(stops), forced)
        size = t.img_size(self.config.image_base_size)
        answer = (t.token_id("<answer>"),) if self.generation.sequence_template == "instruct" else ()
        header = (*answer, t.boi, size)
        forced[recaption_end if "recaption" in task.task else think_end] = header
        # Under sequence parallelism only the buckets whose image tokens it can split (elsewhere all).
        ratios = tuple(ratio for k, ratio in enumerate(t.ratio_ids(len(self.resolution.buckets)))
                       if self.image_tokens(*self.resolution.bucket(k)) % task.image_token_multiple == 0)
        # Where max_new_tokens runs out first, the pass still ends with a size (the reference would
        # fail to read one): the header is forced and the ratio chosen.
        return TextRules(frozenset(ratios), forced, {size: ratios}, closing=header)

    def finish_text(self, task: TextTask, token_ids):
        """The reference's: the text up to the first end of the pass's last part (all of it within
        max_new_tokens when there is none), after its opener; with drop_think only the recaption is
        kept (and a system prompt becomes en_recaption); the ratio token as the image's bucket."""
        t = self.tokenizer
        cot = self.detokenize(task, token_ids)
        system_prompt = task.system_prompt
        if self.generation.drop_think and THINK in cot and RECAPTION in cot:
            recaption = cot.split(RECAPTION)[1]
            if END_RECAPTION in recaption:
                recaption = recaption.split(END_RECAPTION)[0]
            cot = RECAPTION + recaption + END_RECAPTION
            if system_prompt:
                system_prompt = self.system_prompts.named("en_recaption")
        size = None
        if task.choose_size:
            ratios = t.ratio_ids(len(self.resolution.buckets))
            if not token_ids or token_ids[-1] not in ratios:
                raise ValueError(f"the text pass ended without a ratio token (last token {token_ids[-1:]})")
            size = self.resolution.bucket(ratios.index(token_ids[-1]))
        return cot, size, system_prompt

    def detokenize(self, task, token_ids):
        """The pass's opener (its input's last token), then the tokens up to the end of its last
        part (within max_new_tokens where there is none: not the closing that chose a size)
        decoded as the reference decodes them."""
        end = self.tokenizer.token_id(END_RECAPTION if "recaption" in task.task else END_THINK)
        kept = token_ids[:token_ids.index(end) + 1] if end in token_ids else token_ids[:task.sampling.max_new_tokens]
        return TEXT_PASS_OPENERS[task.task.split("_")[0]] + self.tokenizer.decode(kept)

    def describe(self) -> dict:
        # dict: bucket sides rounded down to the VAE factor can repeat at small bases
        sizes = list(dict.fromkeys(f"{w}x{h}" for h, w in self.resolution.buckets))
        base = self.config.image_base_size
        c, g = self.config, self.generation
        return {"family": self.family.name, "image_sizes": sizes, "default_size": f"{base}x{base}",
                "default_num_inference_steps": self.default_num_inference_steps,
                "default_guidance_scale": self.default_guidance_scale,
                "guidance": "distilled (one branch)" if c.cfg_distilled else "classifier-free (two branches)",
                "mean_flow": c.use_meanflow, "solvers": list(self.solvers),
                "max_input_images": self.max_input_images,
                "sequence_template": g.sequence_template, "default_system_prompt": self.system_prompts.default,
                "tasks": ["image", *self.text_tasks], "default_task": self.default_task}

    def load_pipeline(self, parallel, dtype: torch.dtype, load_format: str, quantization: str | None,
                      decode: bool) -> ImagePipeline:
        from .pipeline import HunyuanImage3Pipeline

        return HunyuanImage3Pipeline(self, parallel, dtype, load_format, quantization, decode,
                                     text_head=bool(self.text_tasks))


@dataclass
class TinyModelOptions:
    """`epdiff make-tiny`: the small model's config.json sizes."""

    hidden_size: int = option(128, "config.json hidden_size")
    num_hidden_layers: int = option(2, "config.json num_hidden_layers")
    num_attention_heads: int = option(8, "config.json num_attention_heads")
    num_key_value_heads: int = option(4, "config.json num_key_value_heads")
    num_experts: int = option(8, "config.json num_experts")
    moe_topk: int = option(2, "config.json moe_topk (every layer)")
    moe_intermediate_size: int = option(64, "config.json moe_intermediate_size (experts and the shared expert)")
    image_base_size: int = option(256, "config.json image_base_size (the square bucket's side)")
    patch_embed_hidden_dim: int = option(64, "config.json patch_embed_hidden_dim")
    seed: int = option(0, "seed of the random weights")
    vocab_size: int | None = option(None, "default: the tokenizer's size")
    release_vae: bool = option(False, "the release's VAE config instead of a tiny one")
    variant: str = option("base", "base, instruct (HunyuanImage-3.0-Instruct) or instruct-distil "
                                  "(-Instruct-Distil: guidance distilled, mean flow, 8 steps)",
                          choices=("base", "instruct", "instruct-distil"))
    config_only: bool = option(False, "write configs and tokenizer but no weights (for --load-format dummy at "
                                      "full size)")


def _make_tiny(out_dir: str, options: TinyModelOptions) -> str:
    from .make_tiny import make_tiny

    fields = dict(vars(options))
    release_vae = fields.pop("release_vae")
    make_tiny(out_dir, **fields, vae="release" if release_vae else None)
    return f"wrote a tiny HunyuanImage-3.0 checkpoint to {out_dir}"


@dataclass
class TrainTinyOptions:
    """`epdiff train-tiny`: the shapes model's training run (models/hunyuan_image3/train_tiny.py)."""

    vae_steps: int = option(2000, "VAE training steps")
    transformer_steps: int = option(8000, "transformer training steps")
    vae_batch_size: int = option(32, "VAE batch size")
    batch_size: int = option(128, "transformer batch size")
    device: str | None = option(None, "default: cuda if available, else cpu")
    seed: int = option(0, "seed of the data and the initial weights")
    pool_size: int = option(32768, "jittered training images rendered up front")
    lr: float = option(6e-4, "transformer peak learning rate")
    init_from: str | None = option(None, "a trained shapes model: keep its VAE (no VAE training) and continue "
                                         "its transformer")
    vae_from: str | None = option(None, "a trained shapes model: keep its VAE (no VAE training), train a new "
                                        "transformer")
    one_object_share: float = option(0.15, "fraction of training images with one object (scenes drawn "
                                           "uniformly would give 7 %%)")
    partial_caption_share: float = option(0.0, "fraction of one-object images captioned without their size, "
                                               "position or both (the model then draws 'a small green triangle')")
    max_minutes: float | None = option(None, "cap the whole run: the transformer takes as many of its steps as fit")
    hidden_size: int | None = option(None, "transformer size (default: train_tiny.MODEL_SIZE)")
    num_hidden_layers: int | None = option(None, "transformer size (default: train_tiny.MODEL_SIZE)")
    num_attention_heads: int | None = option(None, "transformer size (default: train_tiny.MODEL_SIZE)")
    moe_intermediate_size: int | None = option(None, "transformer size (default: train_tiny.MODEL_SIZE)")


def _train_tiny(out_dir: str, o: TrainTinyOptions) -> str:
    from .train_tiny import train_tiny

    sizes = {"hidden_size": o.hidden_size, "num_hidden_layers": o.num_hidden_layers,
             "num_attention_heads": o.num_attention_heads, "moe_intermediate_size": o.moe_intermediate_size}
    train_tiny(out_dir, o.vae_steps, o.transformer_steps, o.vae_batch_size, o.batch_size, o.device, o.seed,
               pool_size=o.pool_size, lr=o.lr, model_size={k: v for k, v in sizes.items() if v is not None},
               max_minutes=o.max_minutes, init_from=o.init_from, vae_from=o.vae_from,
               one_object_share=o.one_object_share, partial_caption_share=o.partial_caption_share)
    return f"trained the shapes model into {out_dir}"


class HunyuanImage3Family(ModelFamily):
    name = "hunyuan_image3"
    tools = {
        "make-tiny": FamilyTool("write a small model in the release format", TinyModelOptions, _make_tiny),
        "train-tiny": FamilyTool("train the small shapes model (GPU if present, slowly on CPU)", TrainTinyOptions,
                                 _train_tiny),
    }

    def read(self, model_dir: str) -> HunyuanImage3Info:
        return HunyuanImage3Info(model_dir, self)

    def quantize(self, model_dir, out_dir, quantization, device="cpu"):
        from ...quantization import get_quantization_config
        from ...quantization.checkpoint import write_quantized_checkpoint
        from .weights import is_expert_weight

        HunyuanImage3Config.from_pretrained(model_dir)  # a readable folder of this family, whose
        read_generation_config(model_dir)  # settings epdiff implements
        return write_quantized_checkpoint(model_dir, out_dir, get_quantization_config(quantization),
                                          is_expert_weight, device)
