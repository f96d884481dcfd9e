"""Checkpoint loading: every bad-checkpoint case gets a clear error naming the file and tensor,
and a rank reads only its share."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from epdiff.distributed.parallel_state import ParallelState
from epdiff.loader.safetensors_loader import CheckpointError
from epdiff.models.hunyuan_image3.loading import load_model
from loader_cases import read_share


@pytest.fixture
def pristine(tiny_model):
    return tiny_model(image_base_size=128, seed=1)


@pytest.fixture
def ckpt(pristine, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(pristine, d)
    return str(d)


def index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def rewrite(d, name, value=None, drop=False):
    """Replaces (or drops) one tensor in the shard that holds it."""
    file = index(d)["weight_map"][name]
    tensors = load_file(os.path.join(d, file))
    if drop:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, os.path.join(d, file))
    return file


def load(d):
    return load_model(d, ParallelState.single())


def test_loads_and_matches_both_folder_layouts(ckpt, tmp_path):
    model, checkpoint = load(ckpt)
    single = tmp_path / "single"
    single.mkdir()
    tensors = {}
    for file in set(index(ckpt)["weight_map"].values()):
        tensors.update(load_file(os.path.join(ckpt, file)))
    save_file(tensors, str(single / "model.safetensors"))
    shutil.copy(os.path.join(ckpt, "config.json"), single)
    model2, _ = load(str(single))
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    # vae, lm_head, ln_f are never read for the transformer
    assert not any(n.startswith(("vae.", "lm_head.", "model.ln_f.")) for n in checkpoint.tensors_read)


def test_missing_shard(ckpt):
    os.remove(os.path.join(ckpt, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing shard model-00002-of-00003\.safetensors"):
        load(ckpt)


def test_tensor_missing_from_the_index_is_not_a_silent_partial_load(ckpt):
    idx = index(ckpt)
    del idx["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump(idx, f)
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\) model\.layers\.1\.self_attn\.o_proj\.weight"):
        load(ckpt)


def test_tensor_listed_but_not_in_its_shard(ckpt):
    file = rewrite(ckpt, "model.layers.0.mlp.experts.3.down_proj.weight", drop=True)
    with pytest.raises(CheckpointError, match=rf"{file}: tensor model\.layers\.0\.mlp\.experts\.3\.down_proj\.weight "
                                              r"is listed in the index but not stored"):
        load(ckpt)


def test_an_unknown_tensor_in_a_held_layer_is_refused(ckpt):
    name = "model.layers.0.self_attn.qkv_proj.bias"
    listed = index(ckpt)
    listed["weight_map"][name] = listed["weight_map"]["model.layers.0.self_attn.qkv_proj.weight"]
    with open(os.path.join(ckpt, "model.safetensors.index.json"), "w") as f:
        json.dump(listed, f)
    rewrite(ckpt, name, torch.zeros(8))
    with pytest.raises(CheckpointError, match=f"unexpected tensor {name}"):
        load(ckpt)


def test_wrong_shape(ckpt):
    file = rewrite(ckpt, "model.layers.0.self_attn.qkv_proj.weight", torch.zeros(10, 128, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor model\.layers\.0\.self_attn\.qkv_proj\.weight has "
                                              r"shape \(10, 128\), but config\.json implies \(256, 128\)"):
        load(ckpt)


def test_wrong_dtype(ckpt):
    file = rewrite(ckpt, "model.layers.1.input_layernorm.weight", torch.ones(128, dtype=torch.int32))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor model\.layers\.1\.input_layernorm\.weight has dtype I32"):
        load(ckpt)


def test_corrupt_file(ckpt):
    path = os.path.join(ckpt, "model-00001-of-00003.safetensors")
    with open(path, "wb") as f:
        f.write(b"\x00garbage, not safetensors" * 10)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00003\.safetensors: not a readable safetensors file"):
        load(ckpt)


def test_truncated_file(ckpt):
    path = os.path.join(ckpt, "model-00002-of-00003.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.safetensors"):
        load(ckpt)


@pytest.mark.parametrize("key,value,message", [
    ("hidden_size", 64, r"has shape .* but config\.json implies"),
    ("num_experts", 4, r"names expert [4-7], but config\.json has num_experts=4"),
    ("num_hidden_layers", 1, r"is for layer 1, but config\.json has num_hidden_layers=1"),
])
def test_config_that_disagrees_with_the_weights(ckpt, key, value, message):
    path = os.path.join(ckpt, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[key] = value
    for per_layer in ("moe_topk", "moe_intermediate_size", "num_shared_expert"):
        cfg[per_layer] = cfg[per_layer][: cfg["num_hidden_layers"]]
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=message):
        load(ckpt)


def test_rank_reads_no_byte_of_another_ranks_experts(world8, pristine):
    results = world8.run(2, read_share, pristine)
    for r in results:
        assert r["expert_tensors_read"] == sorted(r["expected_expert_tensors"]), r["ep_rank"]
        assert r["bytes_read"] == r["expected_bytes"]
    # The two ranks' expert reads are disjoint and together cover every expert.
    a, b = (set(r["expert_tensors_read"]) for r in results)
    assert not a & b and len(a | b) == 2 * 8 * 2
