"""HunyuanImage-3.0's checkpoint names <-> this model's parameters, in the release's names and layouts.

This file owns every release tensor name: the generic modules (moe/, layers/) have their own
names, and the tables below translate. Each rank asks, per tensor, whether it needs it and which
slice (TP rows or columns, or nothing for another rank's expert, another stage's layer, or the
text-only and vision tensors), and reads only that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ...layers.linear import ColumnParallelLinear, RowParallelLinear
from ...loader.safetensors_loader import HIGH_PRECISION_DTYPES, CheckpointError, SafetensorsCheckpoint
from ...loader.slicing import copy_checked
from ...moe.layer import MoELayer
from ...moe.router import Router
from ...quantization import QuantizationConfig, config_from_checkpoint

# Not the transformer's: never read by its loader (the VAE and the vision parts have their own:
# load_vae, conditioning.ImageConditioner).
SKIPPED_PREFIXES = ("vae.", "vision_model.", "vision_aligner.")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_and_up_proj|down_proj)\.weight$")
# What a pre-quantized checkpoint stores beside an expert weight (its scale: `weight_scale`).
EXPERT_EXTRA = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_and_up_proj|down_proj)\.weight(_\w+)$")
LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Module-path segment -> the release's name for it (the router's weight sits one level deeper,
# in `gate.wg`; see ROUTER_WEIGHT).
RELEASE_SEGMENTS = {"shared_expert": "shared_mlp", "up_gate_proj": "gate_and_up_proj"}
ROUTER_WEIGHT = "wg.weight"
# GroupedExperts' stacked weight -> the release's per-expert tensor name.
RELEASE_EXPERT_KINDS = {"up_gate_proj": "gate_and_up_proj", "down_proj": "down_proj"}
EXPERT_KIND_OF_RELEASE = {v: k for k, v in RELEASE_EXPERT_KINDS.items()}


def release_name(module_path: str) -> str:
    """The checkpoint name of a parameter path of this model (routed experts and the router aside)."""
    return ".".join(RELEASE_SEGMENTS.get(part, part) for part in module_path.split("."))


def is_expert_weight(name: str) -> bool:
    return EXPERT.match(name) is not None


@dataclass
class WeightSpec:
    shape: tuple[int, ...]  # the full (unsharded) shape the checkpoint must have
    load: Callable  # load(source) copies this rank's part


def weight_specs(model) -> dict[str, WeightSpec]:
    """Every checkpoint tensor this rank loads, except routed experts (see expert_spec)."""
    specs, covered = {}, set()
    for prefix, module in model.named_modules():
        dot = f"{release_name(prefix)}." if prefix else ""
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            # The checkpoint holds the high-precision weight; what its quantization method keeps
            # beside it is made while loading.
            specs[f"{dot}weight"] = WeightSpec(module.full_shape, module.load_weight)
            covered.update(id(p) for name, p in module.named_parameters(recurse=False) if name != "bias")
        elif isinstance(module, Router):
            w = module.weight
            specs[f"{dot}{ROUTER_WEIGHT}"] = WeightSpec(tuple(w.shape), lambda src, w=w: copy_checked(w, src[:].float()))
            covered.add(id(w))
        elif isinstance(module, MoELayer):  # routed experts (and what their method keeps): expert_spec
            covered.update(id(p) for p in module.experts.parameters())
    for name, p in model.named_parameters():
        if id(p) not in covered:
            name = release_name(name)
            specs[name] = WeightSpec(tuple(p.shape), lambda src, p=p, name=name: copy_checked(p, src.full(), name))
    return specs


def expert_spec(model, layer: int, expert: int, kind: str) -> WeightSpec | None:
    """kind: the release's 'gate_and_up_proj' or 'down_proj'. None when this rank does not hold
    the layer or the expert: it is then never read."""
    if str(layer) not in model.model.layers:
        return None
    moe = model.model.layers[str(layer)].mlp
    if not isinstance(moe, MoELayer) or not moe.owns_expert(expert):
        return None
    two_i, d = moe.experts.intermediate_size * 2 * moe.expert_tp, moe.experts.hidden_size
    shape = (two_i, d) if kind == "gate_and_up_proj" else (d, two_i // 2)
    return WeightSpec(shape, lambda src, scale=None: moe.load_expert_weight(expert, EXPERT_KIND_OF_RELEASE[kind],
                                                                            src, scale))


def _num_layers(model) -> int:
    return model.config.num_hidden_layers


def checkpoint_quantization(config, model_dir: str) -> QuantizationConfig | None:
    """The `quantization_config` of a pre-quantized checkpoint's config.json (validated), or None."""
    qc = config.raw.get("quantization_config")
    if qc is None:
        return None
    try:
        return config_from_checkpoint(qc, f"{model_dir}/config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _stored_scale(checkpoint: SafetensorsCheckpoint, name: str, method, weight_shape: tuple[int, int]):
    """The scale a pre-quantized checkpoint stores beside expert weight `name`, checked against
    what its quantization method stores."""
    scale_name = name + method.stored_scale_suffix
    file = checkpoint.weight_map[name]
    if scale_name not in checkpoint:
        raise CheckpointError(f"{file}: quantized tensor {name} has no {scale_name} (its scale)")
    scale = checkpoint.get(scale_name)
    shapes, dtype = method.stored_scale_layout(weight_shape)
    if scale.get_shape() not in shapes:
        raise CheckpointError(f"{scale.file}: tensor {scale_name} has shape {scale.get_shape()}, expected "
                              f"{' or '.join(map(str, shapes[::-1]))}")
    if scale.get_dtype() != dtype:
        raise CheckpointError(f"{scale.file}: tensor {scale_name} has dtype {scale.get_dtype()}, expected {dtype}")
    return scale


def load_checkpoint(model, checkpoint: SafetensorsCheckpoint, stored: QuantizationConfig | None = None) -> None:
    """Loads this rank's share; raises CheckpointError naming the file and tensor on any problem.
    stored: the scheme of a pre-quantized checkpoint (its routed experts are stored quantized, with
    what the scheme keeps beside them); otherwise the model's quantization, if any, is applied here,
    expert by expert, as the checkpoint is read."""
    specs = weight_specs(model)
    pending = set(specs)
    pending_experts = {(int(i), e, kind) for i in model.model.layers for moe in [model.model.layers[i].mlp]
                       if isinstance(moe, MoELayer) for e in moe.local_expert_ids
                       for kind in RELEASE_EXPERT_KINDS.values()}
    stored_method = None if stored is None else stored.experts_method()
    for name in checkpoint.names():
        if name.startswith(SKIPPED_PREFIXES):
            continue
        m = EXPERT.match(name)
        extra = None if m else EXPERT_EXTRA.match(name)
        if m:
            layer, expert, kind = int(m[1]), int(m[2]), m[3]
            if expert >= model.config.num_experts:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} names expert {expert}, but "
                                      f"config.json has num_experts={model.config.num_experts}")
            if layer >= _num_layers(model):
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} is for layer {layer}, but "
                                      f"config.json has num_hidden_layers={_num_layers(model)}")
            spec, key = expert_spec(model, layer, expert, kind), (layer, expert, kind)
        elif extra:
            weight_name = name[:-len(extra[4])]
            if stored_method is None or extra[4] != stored_method.stored_scale_suffix:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} is a quantized weight's "
                                      f"{extra[4].lstrip('_')}, but config.json has no quantization_config that "
                                      "stores one")
            if weight_name not in checkpoint:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} scales {weight_name}, which "
                                      "the checkpoint lacks")
            continue  # read together with its weight
        else:
            spec, key = specs.get(name), name
            layer_m = LAYER.match(name)
            if layer_m and int(layer_m[1]) >= _num_layers(model):
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} is for layer {layer_m[1]}, but "
                                      f"config.json has num_hidden_layers={_num_layers(model)}")
            if spec is None and not _belongs_elsewhere(model, name):
                raise CheckpointError(f"{checkpoint.weight_map[name]}: unexpected tensor {name} "
                                      "(not part of the HunyuanImage-3.0 text-to-image model)")
        if spec is None:
            continue
        source = checkpoint.get(name)
        if source.get_shape() != spec.shape:
            raise CheckpointError(f"{source.file}: tensor {name} has shape {source.get_shape()}, but config.json "
                                  f"implies {spec.shape}")
        dtype, scale = source.get_dtype(), None
        if m and stored is not None:
            if dtype != stored_method.stored_dtype:
                raise CheckpointError(f"{source.file}: tensor {name} has dtype {dtype}, but config.json's "
                                      f"quantization_config says {stored.name} (expected {stored_method.stored_dtype})")
            scale = _stored_scale(checkpoint, name, stored_method, spec.shape)
        elif dtype not in HIGH_PRECISION_DTYPES:
            why = ("only routed experts are quantized" if stored is not None
                   else "config.json has no quantization_config")
            raise CheckpointError(f"{source.file}: tensor {name} is quantized ({dtype}), but {why}")
        try:
            spec.load(source) if scale is None else spec.load(source, scale)
        except ValueError as e:
            raise CheckpointError(f"{source.file}: tensor {name}: {e}") from None
        pending.discard(key)
        pending_experts.discard(key)
    missing = sorted(pending) + [f"model.layers.{i}.mlp.experts.{e}.{k}.weight" for i, e, k in sorted(pending_experts)]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{checkpoint.model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")


def _belongs_elsewhere(model, name: str) -> bool:
    """A tensor of this model that another pipeline stage holds (a tensor of a layer held here
    that no parameter wants is unexpected)."""
    layer = LAYER.match(name)
    if layer:
        return layer[1] not in model.model.layers
    first_stage = ("model.wte.", "timestep_emb.", "guidance_emb.", "timestep_r_emb.", "time_embed.", "patch_embed.")
    last_stage = ("time_embed_2.", "final_layer.", "lm_head.", "model.ln_f.")  # the text head: where it is built
    return name.startswith(first_stage + last_stage)


def export_state_dict(model) -> dict[str, torch.Tensor]:
    """Release-named full tensors of a single-process model (for writing tiny checkpoints)."""
    if model.parallel.config.world_size != 1:
        raise ValueError("export_state_dict needs the whole model in one process")
    if model.quant_config is not None:
        raise ValueError("export_state_dict: the model is quantized; export one loaded without quantization "
                         "(epdiff quantize writes the FP8 checkpoint)")
    out = {}
    for name, p in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and leaf in RELEASE_EXPERT_KINDS:
            for e in range(p.shape[0]):
                out[f"{release_name(prefix)}.{e}.{RELEASE_EXPERT_KINDS[leaf]}.weight"] = p[e].clone()
        elif isinstance(model.get_submodule(prefix), Router):
            out[f"{release_name(prefix)}.{ROUTER_WEIGHT}"] = p.clone()
        elif not name.endswith("expert_load"):
            out[release_name(name)] = p.clone()
    return out


def load_vae(ckpt: SafetensorsCheckpoint, config: dict, device="cpu", with_encoder: bool = False,
             with_decoder: bool = True):
    """The checkpoint's VAE (`vae.*` tensors), fp32; the encoder only when asked (text-to-image
    decodes only, training and edits' input images encode)."""
    from .vae import AutoencoderKLConv3D

    vae = AutoencoderKLConv3D(config, with_encoder=with_encoder, with_decoder=with_decoder).to(device)
    load_whole(vae, ckpt, "vae.", "the VAE")
    return vae.eval()


def load_whole(module, ckpt: SafetensorsCheckpoint, prefix: str, what: str) -> None:
    """A replicated part's every tensor, `prefix` + its own name (a leading `prefix` of the module's
    own names is not doubled), read whole; ValueError names the first tensor the checkpoint lacks."""
    state = {}
    for name in module.state_dict():
        key = prefix + name.removeprefix(prefix)
        if key not in ckpt:
            raise ValueError(f"{ckpt.model_dir}: checkpoint lacks {what}'s tensor {key}")
        state[name] = ckpt.get(key).full()
    module.load_state_dict(state)
