"""Final latents of Tencent's HunyuanImage-3.0 Instruct code (the fork suryatmodulus/HunyuanImage-3.0
at 1ea1526, upstream PR #67) on epdiff's tiny Instruct checkpoints, CPU, fp32: what
tests/test_instruct.py compares epdiff with. Run once; the tensors are committed.

    git clone https://github.com/suryatmodulus/HunyuanImage-3.0 ref && git -C ref checkout 1ea1526
    python -m venv refvenv && refvenv/bin/pip install torch==2.13.0 transformers==5.25.0 diffusers==0.42.1 \
        einops safetensors tokenizers pillow && refvenv/bin/pip install -e .
    refvenv/bin/python scripts/reference_instruct.py ref tests/data/hunyuan_instruct_reference.safetensors

The checkpoints are written by epdiff's make_tiny (tests/test_instruct.py writes the same ones),
so the reference reads epdiff's release layout. Cases (tests/instruct_cases.py CASES):
  distil      Instruct-Distil text to image: 8 steps, guidance 2.5 distilled (<guidance>, <timestep_r>)
  instruct    Instruct, real CFG (guidance 5, two rows), 6 steps
  distil-heun Instruct-Distil, heun-2, 4 steps (8 model calls)
  edit-*      edits: one input image (Distil, and Instruct with real CFG), two of different buckets
The folder's system prompt (en_vanilla of its system_prompt.py) is passed as the reference's
custom system prompt: the reference's own get_system_prompt would give Tencent's text.

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
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
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


def run_reference(folder: str, case: dict) -> torch.Tensor:
    from instruct_cases import input_image

    from hunyuan_image_3.hunyuan_image_3_pipeline import FlowMatchDiscreteScheduler
    from hunyuan_image_3.modeling_hunyuan_image_3 import HunyuanImage3ForCausalMM

    from epdiff.models.hunyuan_image3.system_prompts import SystemPrompts
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
    pipe, captured = model.pipeline, {}
    prepare = pipe.prepare_latents
    pipe.prepare_latents = lambda *a, **k: prepare(*a, **k).float()
    if case["solver"] != "euler":
        scheduler = FlowMatchDiscreteScheduler(shift=generation["flow_shift"], reverse=True, solver=case["solver"])
        set_timesteps = scheduler.set_timesteps

        def evaluation_points(num_steps, device=None, n_tokens=None):
            set_timesteps(num_steps, device)
            scheduler.timesteps = FlowMatchScheduler(num_steps, generation["flow_shift"], case["solver"]).timesteps

        scheduler.set_timesteps = evaluation_points
        pipe.scheduler = model.scheduler = scheduler
    decode = model.vae.decode

    def keep(z, *a, **k):
        captured["latents"] = (z.squeeze(2) * model.vae.config.scaling_factor).detach().clone()
        return decode(z, *a, **k)

    model.vae.decode = keep
    system = SystemPrompts(folder, None).resolve("en_vanilla")
    images = [input_image(name) for name in case.get("images", ())]
    if images:
        # transformers' Siglip2 processor from the same settings, its PIL backend (epdiff's; the
        # torchvision one needs torchvision), asked for stacked tensors (transformers 5 returns lists).
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
        processor = Siglip2ImageProcessorPil(**model.config.vit_processor)
        model.image_processor.vit_info.processor = lambda image, **k: processor(image, return_tensors="pt", **k)
    height, width = case["size"] if isinstance(case["size"], tuple) else (case["size"], case["size"])
    model.generate_image(prompt=case["prompt"], image=images or None, seed=case["seed"],
                         image_size=f"{height}x{width}", bot_task="image", use_system_prompt="custom",
                         system_prompt=system)
    return captured["latents"][0]


def main():
    reference_dir, out = sys.argv[1], sys.argv[2]
    stub_torchvision()
    cpu_workarounds()
    sys.path.insert(0, reference_dir)
    from safetensors.torch import save_file

    from instruct_cases import CASES, make_checkpoint

    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES.items():
            folder = make_checkpoint(os.path.join(tmp, name), case["variant"])
            tensors[name] = run_reference(folder, case).contiguous()
            print(name, tuple(tensors[name].shape), float(tensors[name].std()), flush=True)
    save_file(tensors, out, metadata={"reference": "suryatmodulus/HunyuanImage-3.0@1ea1526",
                                      "command": " ".join(["python", *sys.argv])})


if __name__ == "__main__":
    main()
