"""Final latents of Tencent's HunyuanImage-3.0 Instruct code (the fork suryatmodulus/HunyuanImage-3.0
at 1ea1526, upstream PR #67) on epdiff's tiny Instruct checkpoints, CPU, fp32: what
tests/test_instruct.py compares epdiff with. Run once; the tensors are committed.

    git clone https://github.com/suryatmodulus/HunyuanImage-3.0 ref && git -C ref checkout 1ea1526
    python -m venv refvenv && refvenv/bin/pip install torch==2.13.0 transformers==5.25.0 diffusers==0.42.1 \
        einops safetensors tokenizers pillow && refvenv/bin/pip install -e .
    refvenv/bin/python scripts/reference_instruct.py ref tests/data/hunyuan_instruct_reference.safetensors
    refvenv/bin/python scripts/reference_instruct.py ref tests/data/hunyuan_instruct_text_reference.safetensors --text

The checkpoints are written by epdiff's make_tiny (tests/test_instruct.py writes the same ones),
so the reference reads epdiff's release layout. Cases (tests/instruct_cases.py CASES):
  distil      Instruct-Distil text to image: 8 steps, guidance 2.5 distilled (<guidance>, <timestep_r>)
  instruct    Instruct, real CFG (guidance 5, two rows), 6 steps
  distil-heun Instruct-Distil, heun-2, 4 steps (8 model calls)
  edit-*      edits: one input image (Distil, and Instruct with real CFG), two of different buckets
The folder's system prompt (en_vanilla of its system_prompt.py) is passed as the reference's
custom system prompt: the reference's own get_system_prompt would give Tencent's text.

--text runs tests/instruct_cases.py TEXT_CASES instead: generate_image with bot_task
think_recaption or recaption (the text pass before the image), greedy (do_sample=False, which
overrides the folder's sampling settings), max_new_tokens 32, the case's system prompt of the
folder (en_recaption, en_think_recaption) as the custom one, on checkpoints whose lm_head rows of
</think> and </recaption> are scaled (make_checkpoint's text_bias) so that the random model closes
its sections. Per case NAME: NAME.generated_ids (all the text pass generated after its input:
forced tokens and the ratio token included), NAME.text_input_ids, NAME.image_input_ids (the image
pass's cond row; NAME.image_input_ids_uncond its unconditional row under real CFG),
NAME.cot_text (the cot text generate_image returned, UTF-8 bytes), NAME.ratio_index (the image's
bucket), NAME.text_seed (the seed the text pass drew from Python's random, which it samples its
input images' VAE latents with; Python's random is seeded with the case's seed first) and
NAME.latents (as above).

What the run needs beyond the reference on a CPU with transformers 5 (none changes the math):
torchvision absent (empty modules, but for the ToTensor, Normalize and Compose its conditioning
images go through, written out as torchvision computes them); `torch.empty(device="cuda")` in
its VAE mapped to the CPU; `torch.cuda.set_device(None)` and `nvtx.range` as no-ops; the
`past_key_values` cache name transformers 5 dropped from ALL_CACHE_NAMES (else the KV cache is lost
after the first step); StaticLayer.lazy_initialization given V; the bf16 initial noise cast to fp32
(its GPU run autocasts); its tokenizer given the tiny tokenizer.json's own normalizer and
pre-tokenizer, which transformers 5 drops when it loads a word-level tokenizer; its Siglip2 image
processor is transformers' PIL backend (Siglip2ImageProcessorPil, as in epdiff: the default one
needs torchvision) built from the same vit_processor settings, asked for stacked tensors
(transformers 5 returns lists). The heun-2 case replaces the reference's scheduler (its pipeline hard-codes
euler) and feeds it the evaluation points of epdiff's FlowMatchScheduler, which its own
second-order formulas need (docs/architecture.md, 'Solvers').
The text pass (transformers' GenerationMixin.generate) also needs: its prepare_inputs_for_generation
given the cache under the reference's name `past_key_values` (transformers 5 renames the kwarg to
`cache` and would refuse it as unused: the wrapper's signature is the reference's plus `cache`), and
`use_cache` carried over by its _update_model_kwargs_for_generation (which returns fresh kwargs
without it; transformers 5's decode loop reads it, the model ignores it). The cached decode steps
were checked against one uncached forward of the whole sequence (logits within 4e-7).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import inspect
import json
import os
import sys
import tempfile
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def stub_torchvision():
    import transformers.image_processing_utils  # noqa: F401  (before the stub: it probes torchvision)
    import transformers.image_utils  # noqa: F401

    class InterpolationMode(enum.Enum):
        NEAREST, BILINEAR, BICUBIC, LANCZOS = "nearest", "bilinear", "bicubic", "lanczos"
        BOX, HAMMING, NEAREST_EXACT = "box", "hamming", "nearest-exact"

    class Unused:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, *args):
            raise RuntimeError("torchvision is stubbed out")

    # The three transforms its conditioning-image path applies, as torchvision computes them.
    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

        def __call__(self, x):
            for t in self.transforms:
                x = t(x)
            return x

    class ToTensor:
        def __call__(self, image):
            import numpy as np
            pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).contiguous()
            return pixels.to(torch.float32).div(255)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean, std

        def __call__(self, x):
            mean = torch.as_tensor(self.mean, dtype=x.dtype)[:, None, None]
            std = torch.as_tensor(self.std, dtype=x.dtype)[:, None, None]
            return x.sub(mean).div(std)

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional", "torchvision.transforms.functional", "torchvision.io"):
        module = types.ModuleType(name)
        module.__spec__, module.__path__ = importlib.machinery.ModuleSpec(name, None, is_package=True), []
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    transforms = sys.modules["torchvision.transforms"]
    transforms.InterpolationMode = InterpolationMode
    for name in ("Resize", "CenterCrop", "Lambda", "RandomResizedCrop"):
        setattr(transforms, name, Unused)
    transforms.Compose, transforms.ToTensor, transforms.Normalize = Compose, ToTensor, Normalize
    sys.modules["torchvision.transforms.functional"].pil_to_tensor = None


def cpu_workarounds():
    empty = torch.empty

    def cpu_empty(*args, **kwargs):
        if str(kwargs.get("device", "")) == "cuda":
            kwargs["device"] = "cpu"
        return empty(*args, **kwargs)

    torch.empty = cpu_empty
    set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda d: None if d is None else set_device(d)
    import torch.cuda.nvtx as nvtx
    nvtx.range = lambda *a, **k: contextlib.nullcontext()
    import transformers.cache_utils as cache_utils
    import transformers.generation.utils as generation_utils
    if "past_key_values" not in generation_utils.ALL_CACHE_NAMES:
        generation_utils.ALL_CACHE_NAMES.insert(0, "past_key_values")
    lazy = cache_utils.StaticLayer.lazy_initialization
    cache_utils.StaticLayer.lazy_initialization = lambda self, k, v=None: lazy(self, k, k if v is None else v)


def load_reference(folder: str, case: dict):
    """The reference model on the folder, the case's steps and guidance written to its
    generation_config.json, with the workarounds of the docstring; returns (model, generation)."""
    from hunyuan_image_3.hunyuan_image_3_pipeline import FlowMatchDiscreteScheduler
    from hunyuan_image_3.modeling_hunyuan_image_3 import HunyuanImage3ForCausalMM

    from epdiff.sampling.scheduler import FlowMatchScheduler

    path = os.path.join(folder, "generation_config.json")
    generation = json.load(open(path))
    generation.update(diff_infer_steps=case["steps"], diff_guidance_scale=case["guidance"])
    json.dump(generation, open(path, "w"), indent=2)
    model = HunyuanImage3ForCausalMM.from_pretrained(folder, attn_implementation="sdpa", moe_impl="eager",
                                                     torch_dtype=torch.float32)
    model.load_tokenizer(folder)
    # transformers 5 loads the tiny word-level tokenizer.json without its normalizer and
    # pre-tokenizer (every word becomes one unknown piece): give the reference's tokenizer the
    # file's own pipeline, as `tokenizers` reads it (the release's BPE tokenizer loads whole).
    from tokenizers import Tokenizer
    model.tokenizer._tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    pipe = model.pipeline
    prepare = pipe.prepare_latents
    pipe.prepare_latents = lambda *a, **k: prepare(*a, **k).float()
    if case.get("solver", "euler") != "euler":
        scheduler = FlowMatchDiscreteScheduler(shift=generation["flow_shift"], reverse=True, solver=case["solver"])
        set_timesteps = scheduler.set_timesteps

        def evaluation_points(num_steps, device=None, n_tokens=None):
            set_timesteps(num_steps, device)
            scheduler.timesteps = FlowMatchScheduler(num_steps, generation["flow_shift"], case["solver"]).timesteps

        scheduler.set_timesteps = evaluation_points
        pipe.scheduler = model.scheduler = scheduler
    return model, generation


def capture_latents(model, captured: dict) -> None:
    decode = model.vae.decode

    def keep(z, *a, **k):
        captured["latents"] = (z.squeeze(2) * model.vae.config.scaling_factor).detach().clone()
        return decode(z, *a, **k)

    model.vae.decode = keep


def input_images(model, case: dict) -> list:
    from instruct_cases import input_image

    images = [input_image(name) for name in case.get("images", ())]
    if images:
        # transformers' Siglip2 processor from the same settings, its PIL backend (epdiff's; the
        # torchvision one needs torchvision), asked for stacked tensors (transformers 5 returns lists).
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
        processor = Siglip2ImageProcessorPil(**model.config.vit_processor)
        model.image_processor.vit_info.processor = lambda image, **k: processor(image, return_tensors="pt", **k)
    return images


def run_reference(folder: str, case: dict) -> torch.Tensor:
    from epdiff.models.hunyuan_image3.system_prompts import SystemPrompts

    model, _ = load_reference(folder, case)
    captured = {}
    capture_latents(model, captured)
    system = SystemPrompts(folder, None).resolve("en_vanilla")
    images = input_images(model, case)
    height, width = case["size"] if isinstance(case["size"], tuple) else (case["size"], case["size"])
    model.generate_image(prompt=case["prompt"], image=images or None, seed=case["seed"],
                         image_size=f"{height}x{width}", bot_task="image", use_system_prompt="custom",
                         system_prompt=system)
    return captured["latents"][0]


def text_generate_workarounds(model) -> None:
    """What transformers 5's GenerationMixin.generate needs to run the reference's text pass."""
    # generate renames the reference's `past_key_values` kwarg to `cache` (and refuses it as unused):
    # hand it back to the reference's prepare_inputs_for_generation under its own name.
    prepare = model.prepare_inputs_for_generation

    def prepare_inputs(input_ids, cache=None, past_key_values=None, **kwargs):
        return prepare(input_ids, past_key_values=cache if past_key_values is None else past_key_values, **kwargs)

    # generate checks its kwargs against this signature: the reference's, `cache` added
    *named, rest = inspect.signature(prepare).parameters.values()
    cache = inspect.Parameter("cache", inspect.Parameter.KEYWORD_ONLY, default=None)
    prepare_inputs.__signature__ = inspect.signature(prepare).replace(parameters=[*named, cache, rest])
    model.prepare_inputs_for_generation = prepare_inputs
    # the reference's _update_model_kwargs_for_generation returns fresh kwargs without
    # `use_cache`, which transformers 5's decode loop reads (the model ignores it): carry it over.
    update = model._update_model_kwargs_for_generation

    def update_kwargs(outputs, model_kwargs, *args, **kwargs):
        updated = update(outputs, model_kwargs, *args, **kwargs)
        updated.setdefault("use_cache", model_kwargs.get("use_cache"))
        return updated

    model._update_model_kwargs_for_generation = update_kwargs


def run_text_reference(folder: str, case: dict) -> dict[str, torch.Tensor]:
    """A TEXT_CASES case: generate_image with a think/recaption bot_task, greedy. Returns the text
    pass's input ids and the ids it generated (outputs[0, input_length:], forced and ratio tokens
    included), the cot text generate_image returned (UTF-8 bytes), the ratio index and input ids
    (both rows under real CFG) of the image pass, the seed the text pass drew, and the final latents."""
    import random

    from epdiff.models.hunyuan_image3.system_prompts import SystemPrompts

    model, _ = load_reference(folder, case)
    captured, calls, seeds = {}, [], []
    capture_latents(model, captured)
    generate = model.generate

    def record(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    model.generate = record
    prepare_seed = model.prepare_seed

    def record_seed(seed, batch_size):
        seeds.append(prepare_seed(seed=seed, batch_size=batch_size))
        return seeds[-1]

    model.prepare_seed = record_seed
    text_generate_workarounds(model)
    system = SystemPrompts(folder, None).resolve(case["system"])
    images = input_images(model, case)
    size = case["size"]
    image_size = size if size == "auto" else f"{size}x{size}"
    # generate_image gives its text pass no seed: prepare_seed draws one from Python's random (it
    # samples the input images' VAE latents of that pass). Seeded here so that a run is reproducible;
    # the seed drawn is recorded (text_seed).
    random.seed(case["seed"])
    cot_text, _ = model.generate_image(prompt=case["prompt"], image=images or None, seed=case["seed"],
                                       image_size=image_size, bot_task=case["bot_task"],
                                       use_system_prompt="custom", system_prompt=system,
                                       max_new_tokens=case["max_new_tokens"], do_sample=case["do_sample"])
    (text_kwargs, text_out), (image_kwargs, _) = calls
    assert text_kwargs["mode"] == "gen_text" and image_kwargs["mode"] == "gen_image", [k["mode"] for k, _ in calls]
    assert seeds[1] == [case["seed"]], seeds
    text_ids = text_kwargs["input_ids"]
    image_ids = image_kwargs["input_ids"]
    generated = text_out[0, text_ids.shape[1]:]
    info = image_kwargs["batch_gen_image_info"][0]
    if size == "auto":  # the image's bucket is the ratio token's
        assert info.ratio_index == model.tokenizer.get_all_ratio_token_ids().index(int(generated[-1])), info
    tensors = {
        "generated_ids": generated,
        "text_input_ids": text_ids[0],
        "image_input_ids": image_ids[0],
        "cot_text": torch.tensor(list(cot_text[0].encode("utf-8")), dtype=torch.uint8),
        "ratio_index": torch.tensor(info.ratio_index),
        "text_seed": torch.tensor(seeds[0][0]),
        "latents": captured["latents"][0],
    }
    if image_ids.shape[0] > 1:  # real CFG: the unconditional row
        tensors["image_input_ids_uncond"] = image_ids[1]
    return {k: v.to(torch.int64) if k not in ("cot_text", "latents") else v for k, v in tensors.items()}


def print_text_case(name: str, tensors: dict, folder: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ids = tensors[f"{name}.generated_ids"].tolist()
    print(f"== {name}\n  generated_ids {ids}\n  tokens {[tokenizer.id_to_token(i) for i in ids]}"
          f"\n  cot_text {bytes(tensors[f'{name}.cot_text'].tolist()).decode()!r}"
          f"\n  ratio_index {int(tensors[f'{name}.ratio_index'])}"
          f"  latents {tuple(tensors[f'{name}.latents'].shape)} std {float(tensors[f'{name}.latents'].std())}",
          flush=True)


def main():
    text = "--text" in sys.argv[1:]
    reference_dir, out = [a for a in sys.argv[1:] if a != "--text"]
    stub_torchvision()
    cpu_workarounds()
    sys.path.insert(0, reference_dir)
    from safetensors.torch import save_file

    from instruct_cases import CASES, TEXT_CASES, make_checkpoint

    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in (TEXT_CASES if text else {}).items():
            folder = make_checkpoint(os.path.join(tmp, name), case["variant"], case.get("text_bias"))
            for key, value in run_text_reference(folder, case).items():
                tensors[f"{name}.{key}"] = value.contiguous()
            print_text_case(name, tensors, folder)
        for name, case in ({} if text else CASES).items():
            folder = make_checkpoint(os.path.join(tmp, name), case["variant"])
            tensors[name] = run_reference(folder, case).contiguous()
            print(name, tuple(tensors[name].shape), float(tensors[name].std()), flush=True)
    save_file(tensors, out, metadata={"reference": "suryatmodulus/HunyuanImage-3.0@1ea1526",
                                      "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
