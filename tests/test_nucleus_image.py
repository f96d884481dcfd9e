"""Nucleus-Image (issue 21): parity with diffusers' own pipeline, every layout with EP against one
rank, each rank's reads, and loud refusals of bad folders."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from epdiff.config import ConfigError
from epdiff.engine import ImageGenerator
from epdiff.models.registry import family_for_folder
from layouts import ep_modes, layout
from nucleus_cases import checkpoint_bytes, layouts_against_one_rank

# heads 8 of 16 with 4 KV heads (GQA), so that TP x SP = 4 can split them.
SIZES = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, num_experts=8, seed=1)


@pytest.fixture(scope="session")
def nucleus(tmp_path_factory):
    from epdiff.models.nucleus_image.make_tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("nucleus")), **SIZES)


def diffusers_pipeline(folder):
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline,
                           NucleusMoEImageTransformer2DModel)
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    return NucleusMoEImagePipeline(
        transformer=NucleusMoEImageTransformer2DModel.from_pretrained(f"{folder}/transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(f"{folder}/scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(f"{folder}/vae"),
        text_encoder=Qwen3VLForConditionalGeneration.from_pretrained(f"{folder}/text_encoder"),
        processor=AutoTokenizer.from_pretrained(f"{folder}/processor"))


@pytest.mark.parametrize("prompts, guidance", [
    (["a small red circle on the left"], 4.0),
    # two prompts of different lengths in one batch: padded and masked text, a generator each
    (["a red circle", "a large blue square at the top and a small green triangle at the bottom"], 4.0),
    (["a small red circle on the left"], 1.0),  # no guidance: one branch
])
def test_same_latents_and_image_as_the_diffusers_pipeline(nucleus, prompts, guidance):
    kw = dict(num_inference_steps=4, guidance_scale=guidance, height=64, width=96)
    with ImageGenerator(model=nucleus) as generator:
        ours = generator.generate_outputs(prompts, seed=7, **kw)  # prompt i with seed 7 + i
    pipe = diffusers_pipeline(nucleus)

    def run(output_type):
        generators = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
        with torch.no_grad():
            return pipe(prompts, generator=generators, output_type=output_type, **kw).images

    latents, pixels = run("latent"), run("np")
    for i, out in enumerate(ours):
        image = out.images[0]
        assert image.latents.shape == (4, 6, 64)  # the patch grid of a 64x96 image: 4 x 6 tokens
        assert float((image.latents.flatten(0, 1) - latents[i]).norm() / latents[i].norm()) <= 1e-4
        levels = (pixels[i] * 255).round().astype(np.uint8)
        assert image.pixels.shape == levels.shape == (64, 96, 3)
        assert np.abs(image.pixels.astype(int) - levels.astype(int)).max() <= 1


LAYOUTS = {
    2: [layout(tp=2), layout(sp=2), layout(cfg=2), layout(dp=2), layout(pp=2)],
    4: [layout(tp=2, sp=2), layout(sp=2, cfg=2), layout(tp=2, dp=2), layout(sp=2, pp=2)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_with_and_without_ep_gives_the_one_rank_latents(world8, nucleus, world):
    rows = []
    for config in LAYOUTS[world]:
        rows += [r for per_rank in world8.run(world, layouts_against_one_rank, nucleus, ep_modes(config))
                 for r in per_rank]
    assert len(rows) == world * len(LAYOUTS[world]) * 3
    bad = [r for r in rows if not r["close"]]
    assert not bad, bad[:5]


def test_fp8_gives_the_one_rank_fp8_latents_on_layouts_with_ep(world8, nucleus):
    configs = [layout(sp=2), layout(sp=2, ep=True, backend="alltoall"), layout(tp=2, ep=True)]
    rows = [r for per_rank in world8.run(2, layouts_against_one_rank, nucleus, configs, "fp8") for r in per_rank]
    assert len(rows) == 6
    # FP8 is on: the latents move, by a few per cent (per-channel weights, per-token activations)
    assert all(0 < r["quantization_err"] < 0.2 for r in rows), rows
    # SP alone keeps every sum in the one rank's order: the same latents.
    assert all(r["close"] for r in rows if not r["ep"]), rows
    # EP sums a token's experts per EP rank and then the ranks' partial sums, TP sums partial outputs,
    # CFG runs a batch of one instead of two (other matmul blocking): a difference of 1e-7 that moves
    # an activation across an FP8 rounding boundary becomes one FP8 step (6 %) of that value, and the
    # expert choice may then pick another token: close, not equal (measured: ~1 % of the largest
    # value; the unquantized runs agree to 1e-5).
    assert all(r["err"] <= 0.05 * r["scale"] for r in rows), rows


def test_a_rank_reads_only_its_own_experts(world8, nucleus):
    ranks = world8.run(2, checkpoint_bytes, nucleus, layout(dp=2, ep=True))
    expert_bytes = total = 0
    index = json.load(open(f"{nucleus}/transformer/diffusion_pytorch_model.safetensors.index.json"))["weight_map"]
    for name, file in index.items():
        with safe_open(f"{nucleus}/transformer/{file}", "pt") as f:
            size = f.get_slice(name).get_shape()
        n = int(np.prod(size)) * 4
        total += 0 if name.endswith("norm_added_q.weight") else n  # never read: diffusers does not use it
        expert_bytes += n if ".experts." in name else 0
    assert sorted(ranks[0]["experts"] + ranks[1]["experts"]) == list(range(8))
    for r in ranks:
        assert r["bytes_read"] == total - expert_bytes * (8 - len(r["experts"])) // 8


def broken_copy(nucleus, tmp_path, edit):
    folder = str(tmp_path / "broken")
    shutil.copytree(nucleus, folder)
    edit(folder)
    return folder


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("edit, message", [
    (lambda d: os.remove(f"{d}/model_index.json"), "no config.json or model_index.json"),
    (lambda d: shutil.rmtree(f"{d}/vae"), "lists 'vae', but"),
    (lambda d: edit_json(f"{d}/model_index.json", _class_name="FluxPipeline"), "_class_name 'FluxPipeline'"),
    (lambda d: edit_json(f"{d}/transformer/config.json", capacity_factors=[4.0, 2.0]),
     "capacity_factors (4.0, 2.0): 2 values for num_layers 6"),
    (lambda d: edit_json(f"{d}/transformer/config.json", dense_moe_strategy="every_other"),
     "dense_moe_strategy 'every_other'"),
    (lambda d: edit_json(f"{d}/transformer/config.json", joint_attention_dim=48), "joint_attention_dim 48 differs"),
    (lambda d: edit_json(f"{d}/transformer/config.json", qk_layernorm=True), "field 'qk_layernorm'"),
])
def test_bad_folders_are_refused_naming_the_file_and_field(nucleus, tmp_path, edit, message):
    folder = broken_copy(nucleus, tmp_path, edit)
    with pytest.raises(ConfigError) as e:
        family_for_folder(folder).read(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_tensor_of_the_wrong_shape_is_refused_naming_the_file_and_tensor(nucleus, tmp_path):
    from safetensors.torch import load_file, save_file

    from epdiff.loader.safetensors_loader import CheckpointError
    from epdiff.models.nucleus_image.pipeline import load_transformer
    from epdiff.distributed.parallel_state import ParallelState

    folder = broken_copy(nucleus, tmp_path, lambda d: None)
    index = json.load(open(f"{folder}/transformer/diffusion_pytorch_model.safetensors.index.json"))["weight_map"]
    name = "transformer_blocks.3.img_mlp.experts.down_proj"
    path = f"{folder}/transformer/{index[name]}"
    tensors = load_file(path)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, path)
    info = family_for_folder(folder).read(folder)
    with pytest.raises(CheckpointError, match=f"{index[name]}: tensor {name} has shape"):
        load_transformer(info, ParallelState.single(), torch.float32, "cpu")


def test_models_endpoint_describes_the_family_with_sizes_it_takes(nucleus):
    info = family_for_folder(nucleus).read(nucleus)
    described = info.describe()
    assert described["family"] == "nucleus_image" and described["default_size"] == "1024x1024"
    assert isinstance(described["image_sizes"], list) and "1024x1024" in described["image_sizes"]
    for size in described["image_sizes"]:  # the page offers them: each must be one the model takes
        width, height = map(int, size.split("x"))
        assert info.resolve_size(height, width) == (height, width)
