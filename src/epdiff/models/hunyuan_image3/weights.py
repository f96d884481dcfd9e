"""Checkpoint name -> parameter mapping for HunyuanImage-3.0, in the release's names and layouts.

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
from torch import nn

from ...layers.norm import RMSNorm
from ...layers.linear import ColumnParallelLinear, RowParallelLinear, copy_checked
from ...loader.safetensors_loader import CheckpointError, SafetensorsCheckpoint
from ...moe import MoELayer, Router
from ...moe.experts import GroupedExperts
from ...quantization import Fp8Config, get_quantization_config
from ...quantization import fp8

# Not used by text-to-image: never read.
SKIPPED_PREFIXES = ("vae.", "vision_model.", "vision_aligner.", "lm_head.", "model.ln_f.", "guidance_emb.",
                    "timestep_r_emb.")
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_and_up_proj|down_proj)\.weight$")
# A pre-quantized (FP8) checkpoint stores each expert weight's per-output-channel scale beside it.
EXPERT_SCALE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_and_up_proj|down_proj)\.weight_scale$")
SCALE_SUFFIX = "_scale"
LAYER = re.compile(r"model\.layers\.(\d+)\.")
# Module-path segment -> the release's name for it (the router's weight sits one level deeper,
# in `gate.wg`; see ROUTER_WEIGHT).
RELEASE_SEGMENTS = {"shared_expert": "shared_mlp", "up_gate_proj": "gate_and_up_proj"}
ROUTER_WEIGHT = "wg.weight"
# GroupedExperts' stacked parameter -> the release's per-expert tensor name.
RELEASE_EXPERT_KINDS = {"w13": "gate_and_up_proj", "w2": "down_proj"}
EXPERT_KIND_OF_RELEASE = {v: k for k, v in RELEASE_EXPERT_KINDS.items()}


def release_name(module_path: str) -> str:
    """The checkpoint name of a parameter path of this model (routed experts and the router aside)."""
    return ".".join(RELEASE_SEGMENTS.get(part, part) for part in module_path.split("."))


@dataclass
class WeightSpec:
    shape: tuple[int, ...]  # the full (unsharded) shape the checkpoint must have
    load: Callable  # load(source) copies this rank's part


def weight_specs(model) -> dict[str, WeightSpec]:
    """Every checkpoint tensor this rank loads, except routed experts (see expert_spec)."""
    specs, covered = {}, set()
    for prefix, module in model.named_modules():
        dot = f"{release_name(prefix)}." if prefix else ""
        if isinstance(module, ColumnParallelLinear):
            w = module.weight
            specs[f"{dot}weight"] = WeightSpec((w.shape[0] * module.tp.size, w.shape[1]), module.load_weight)
            covered.add(id(w))
            if module.fp8:  # quantized while loading: the checkpoint holds the high-precision weight
                covered.add(id(module.weight_scale))
        elif isinstance(module, RowParallelLinear):
            w = module.weight
            specs[f"{dot}weight"] = WeightSpec((w.shape[0], w.shape[1] * module.tp.size), module.load_weight)
            covered.add(id(w))
        elif isinstance(module, Router):
            w = module.weight
            specs[f"{dot}{ROUTER_WEIGHT}"] = WeightSpec(tuple(w.shape), lambda src, w=w: copy_checked(w, src[:].float()))
            covered.add(id(w))
        elif isinstance(module, MoELayer):  # routed experts (and their FP8 scales): expert_spec
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
    two_i, d = moe.experts.w13.shape[1] * moe.expert_tp, moe.experts.w13.shape[2]
    shape = (two_i, d) if kind == "gate_and_up_proj" else (d, two_i // 2)
    return WeightSpec(shape, lambda src, scale=None: moe.load_expert_weight(expert, EXPERT_KIND_OF_RELEASE[kind],
                                                                            src, scale))


def _num_layers(model) -> int:
    return model.config.num_hidden_layers


def checkpoint_quantization(config, model_dir: str) -> Fp8Config | None:
    """The `quantization_config` of a pre-quantized checkpoint's config.json (validated), or None."""
    qc = config.raw.get("quantization_config")
    if qc is None:
        return None
    try:
        return Fp8Config.from_checkpoint_config(qc, f"{model_dir}/config.json")
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _expert_scale(checkpoint: SafetensorsCheckpoint, name: str, rows: int):
    """The per-channel scale stored beside FP8 expert weight `name`, checked."""
    scale_name = name + SCALE_SUFFIX
    file = checkpoint.weight_map[name]
    if scale_name not in checkpoint:
        raise CheckpointError(f"{file}: float8 tensor {name} has no {scale_name} (its per-output-channel scale)")
    scale = checkpoint.get(scale_name)
    if scale.get_shape() not in ((rows,), (rows, 1)):
        raise CheckpointError(f"{scale.file}: tensor {scale_name} has shape {scale.get_shape()}, expected ({rows}, 1) "
                              "(one scale per output channel)")
    if scale.get_dtype() != "F32":
        raise CheckpointError(f"{scale.file}: tensor {scale_name} has dtype {scale.get_dtype()}, expected F32")
    return scale


def load_checkpoint(model, checkpoint: SafetensorsCheckpoint, quantized: bool = False) -> None:
    """Loads this rank's share; raises CheckpointError naming the file and tensor on any problem.
    quantized: the checkpoint is pre-quantized (float8 routed experts with `weight_scale`s);
    otherwise FP8 experts are quantized here, expert by expert, as they are read."""
    specs = weight_specs(model)
    pending = set(specs)
    pending_experts = {(int(i), e, kind) for i in model.model.layers for moe in [model.model.layers[i].mlp]
                       if isinstance(moe, MoELayer) for e in moe.local_expert_ids
                       for kind in RELEASE_EXPERT_KINDS.values()}
    for name in checkpoint.names():
        if name.startswith(SKIPPED_PREFIXES):
            continue
        m = EXPERT.match(name)
        if m:
            layer, expert, kind = int(m[1]), int(m[2]), m[3]
            if expert >= model.config.num_experts:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} names expert {expert}, but "
                                      f"config.json has num_experts={model.config.num_experts}")
            if layer >= _num_layers(model):
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} is for layer {layer}, but "
                                      f"config.json has num_hidden_layers={_num_layers(model)}")
            spec, key = expert_spec(model, layer, expert, kind), (layer, expert, kind)
        elif EXPERT_SCALE.match(name):
            if not quantized:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} is an FP8 weight scale, but "
                                      "config.json has no quantization_config")
            if name[:-len(SCALE_SUFFIX)] not in checkpoint:
                raise CheckpointError(f"{checkpoint.weight_map[name]}: tensor {name} scales "
                                      f"{name[:-len(SCALE_SUFFIX)]}, which the checkpoint lacks")
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
        is_fp8 = source.get_dtype() == fp8.SAFETENSORS_FP8
        scale = None
        if m and quantized:
            if not is_fp8:
                raise CheckpointError(f"{source.file}: tensor {name} has dtype {source.get_dtype()}, but config.json's "
                                      f"quantization_config says fp8 (expected {fp8.SAFETENSORS_FP8})")
            scale = _expert_scale(checkpoint, name, spec.shape[0])
        elif is_fp8:
            why = ("only routed experts are quantized" if quantized else "config.json has no quantization_config")
            raise CheckpointError(f"{source.file}: tensor {name} is float8 ({fp8.SAFETENSORS_FP8}), but {why}")
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
    first_stage = ("model.wte.", "timestep_emb.", "time_embed.", "patch_embed.")
    last_stage = ("time_embed_2.", "final_layer.")
    return name.startswith(first_stage + last_stage)


def init_dummy_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """--load-format dummy: random weights of the real shapes, made on the device, local experts only.
    FP8 experts are the quantization of the very values a model without quantization draws (one
    layer's experts at a time in the model dtype), so the two can be compared."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupedExperts) and module.fp8:
                for kind in ("w13", "w2"):
                    param = getattr(module, kind)
                    value = torch.empty(param.shape, dtype=module.dtype, device=param.device)
                    value.normal_(0.0, std, generator=g)
                    for e in range(param.shape[0]):
                        module.load_expert(e, kind, value[e])
                    del value
                continue
            if isinstance(module, ColumnParallelLinear) and module.fp8:
                value = torch.empty(module.weight.shape, dtype=module.dtype, device=module.weight.device)
                module.set_weight(value.normal_(0.0, std, generator=g))
                if module.bias is not None:
                    module.bias.zero_()
                continue
            is_norm = isinstance(module, (RMSNorm, nn.GroupNorm))
            for name, p in module.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.dim() == 1:
                    p.zero_()  # biases
                else:
                    p.normal_(0.0, std, generator=g)


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


def load_moe_block(moe: MoELayer, state: dict[str, torch.Tensor]) -> None:
    """One MoE block from unsharded tensors with the release's names relative to the block
    (`gate.wg.weight`, `experts.{e}.gate_and_up_proj.weight`, `shared_mlp...`). For tests and tools."""
    copy_checked(moe.gate.weight, state[f"gate.{ROUTER_WEIGHT}"].float(), f"gate.{ROUTER_WEIGHT}")
    for e in moe.local_expert_ids:
        for kind, release_kind in RELEASE_EXPERT_KINDS.items():
            moe.load_expert_weight(e, kind, state[f"experts.{e}.{release_kind}.weight"])
    if moe.shared_expert is not None:
        for linear in ("up_gate_proj", "down_proj"):
            name = release_name(f"shared_expert.{linear}.weight")
            getattr(moe.shared_expert, linear).load_weight(state[name], name)


def load_vae(ckpt: SafetensorsCheckpoint, config: dict, device="cpu", with_encoder: bool = False):
    """The checkpoint's VAE (`vae.*` tensors), fp32; the encoder only when asked (text-to-image
    decodes only, training encodes)."""
    from .vae import AutoencoderKLConv3D

    vae = AutoencoderKLConv3D(config, with_encoder=with_encoder).to(device)
    state = {}
    for name in vae.state_dict():
        key = f"vae.{name}"
        if key not in ckpt:
            raise ValueError(f"{ckpt.model_dir}: checkpoint lacks VAE tensor {key}")
        state[name] = ckpt.get(key).full()
    vae.load_state_dict(state)
    return vae.eval()


def load_model(model_dir: str, parallel, dtype=torch.float32, device="cpu", load_format: str = "safetensors",
               config=None, quantization: str | None = None):
    """Builds this rank's part of the model and fills it: from the checkpoint (reading only this
    rank's share) or, with load_format='dummy', with random weights made on the device.

    quantization: 'fp8' makes the routed experts float8 (quantized as a bf16 checkpoint is read,
    or read as stored from a pre-quantized one); None keeps them in dtype, except that a
    pre-quantized checkpoint (config.json with `quantization_config`) always loads as stored."""
    from .config import HunyuanImage3Config
    from .model import HunyuanImage3Transformer

    if load_format not in ("safetensors", "dummy"):
        raise ValueError(f"unknown load format {load_format!r}; choose 'safetensors' or 'dummy'")
    quant_config = get_quantization_config(quantization)
    config = config or HunyuanImage3Config.from_pretrained(model_dir)
    stored = checkpoint_quantization(config, model_dir)
    quant_config = quant_config or stored
    checkpoint = SafetensorsCheckpoint(model_dir) if load_format == "safetensors" else None
    with torch.device(device):
        model = HunyuanImage3Transformer(config, parallel, dtype=dtype, device=device, quant_config=quant_config)
    if checkpoint is None:
        init_dummy_weights(model)
    else:
        load_checkpoint(model, checkpoint, quantized=stored is not None)
    model.eval()
    return model, checkpoint


def write_quantized_checkpoint(model_dir: str, out_dir: str, quantization: str = "fp8", device="cpu") -> dict:
    """`epdiff quantize`: a pre-quantized copy of a checkpoint. Routed expert weights become
    float8 with a per-output-channel `weight_scale` [N, 1] beside each; every other tensor and
    file is copied, and config.json gains `quantization_config`. Shard by shard, tensor by
    tensor: memory holds one shard's output, never the model. Returns a summary."""
    import json
    import os
    import shutil

    from safetensors.torch import save_file

    from .config import HunyuanImage3Config

    quant_config = get_quantization_config(quantization)
    if quant_config is None:
        raise ValueError("give --quantization (supported: fp8)")
    config = HunyuanImage3Config.from_pretrained(model_dir)
    if checkpoint_quantization(config, model_dir) is not None:
        raise ValueError(f"{model_dir}: already quantized (config.json has a quantization_config)")
    if os.path.abspath(out_dir) == os.path.abspath(model_dir):
        raise ValueError(f"output folder {out_dir!r} is the model folder: write the quantized copy elsewhere")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"output folder {out_dir!r} exists and is not empty")
    checkpoint = SafetensorsCheckpoint(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    weight_map, quantized, bytes_in, bytes_out = {}, 0, 0, 0
    for file in sorted(set(checkpoint.weight_map.values())):
        tensors = {}
        for name in sorted(n for n, f in checkpoint.weight_map.items() if f == file):
            t = checkpoint.get(name).full()
            bytes_in += t.numel() * t.element_size()
            if EXPERT.match(name):
                if t.dim() != 2:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected a matrix")
                q, scale = fp8.quantize_weight(t.to(device))
                tensors[name], tensors[name + SCALE_SUFFIX] = q.cpu(), scale[:, None].cpu()
                quantized += 1
            else:
                tensors[name] = t
        save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            bytes_out += t.numel() * t.element_size()
        del tensors
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": bytes_out}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    for entry in sorted(os.listdir(model_dir)):
        src = os.path.join(model_dir, entry)
        if entry.endswith(".safetensors") or entry == "model.safetensors.index.json" or not os.path.isfile(src):
            continue
        if entry == "config.json":
            with open(src) as f:
                raw = json.load(f)
            raw["quantization_config"] = quant_config.checkpoint_config()
            with open(os.path.join(out_dir, entry), "w") as f:
                json.dump(raw, f, indent=2)
        else:
            shutil.copy2(src, os.path.join(out_dir, entry))
    return dict(out_dir=out_dir, quantized_tensors=quantized, bytes_in=bytes_in, bytes_out=bytes_out)
