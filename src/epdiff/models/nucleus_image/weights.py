"""Nucleus-Image's checkpoint names (transformer/ of its diffusers folder) <-> this model's
parameters. Owns every checkpoint tensor name: the generic MLP and MoE modules have their own names,
and the tables here translate. Each rank reads only what it holds: its TP rows or columns, its
experts (a slice of the packed [E, ...] tensors), its stage's blocks.
"""

from __future__ import annotations

import re

import torch

from ...layers.linear import ColumnParallelLinear, RowParallelLinear
from ...loader.safetensors_loader import HIGH_PRECISION_DTYPES, CheckpointError, SafetensorsCheckpoint
from ...loader.slicing import copy_checked
from ...moe.layer import MoELayer
from ...moe.router import ExpertChoiceRouter

WEIGHTS_NAME = "diffusion_pytorch_model"  # diffusers' file name
# In the checkpoint, unused by the model (diffusers creates the text query norm, and never calls it).
SKIPPED = re.compile(r"transformer_blocks\.\d+\.attn\.norm_added_q\.weight$")
BLOCK = re.compile(r"transformer_blocks\.(\d+)\.")
EXPERTS = re.compile(r"transformer_blocks\.(\d+)\.img_mlp\.experts\.(gate_up_proj|down_proj)$")
# Generic module-path segment -> the diffusers name (FeedForward's `net.0.proj` and `net.2`).
CHECKPOINT_PATHS = {"up_gate_proj": "net.0.proj", "down_proj": "net.2"}


def checkpoint_name(module_path: str) -> str:
    return ".".join(CHECKPOINT_PATHS.get(part, part) for part in module_path.split("."))


def _specs(model) -> dict[str, tuple[tuple[int, ...], object]]:
    """name -> (full shape, load(source)) for every tensor this rank reads."""
    specs, covered = {}, set()
    for prefix, module in model.named_modules():
        dot = f"{checkpoint_name(prefix)}." if prefix else ""
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            specs[f"{dot}weight"] = (module.full_shape, module.load_weight)
            covered.update(id(p) for name, p in module.named_parameters(recurse=False))
        elif isinstance(module, ExpertChoiceRouter):
            w = module.weight
            specs[f"{dot}weight"] = (tuple(w.shape), lambda src, w=w: copy_checked(w, src.full(), "gate.weight"))
            covered.add(id(w))
        elif isinstance(module, MoELayer):
            covered.update(id(p) for p in module.experts.parameters())
            for kind in ("gate_up_proj", "down_proj"):
                specs[f"{dot}experts.{kind}"] = (_packed_shape(model.config, kind),
                                                 lambda src, m=module, k=kind: _load_experts(m, k, src))
    for name, p in model.named_parameters():
        if id(p) not in covered:
            specs[checkpoint_name(name)] = (tuple(p.shape), lambda src, p=p, n=name: copy_checked(p, src.full(), n))
    return specs


def _packed_shape(c, kind: str) -> tuple[int, int, int]:
    d, i = c.hidden_size, c.moe_intermediate_dim
    return (c.num_experts, d, 2 * i) if kind == "gate_up_proj" else (c.num_experts, i, d)


def _load_experts(moe: MoELayer, kind: str, source) -> None:
    """diffusers packs every expert in one tensor, transposed: gate_up_proj [E, D, 2I] (gate, then
    up), down_proj [E, I, D]. Reads only this rank's experts' rows of it."""
    for expert in moe.local_expert_ids:
        w = source[expert]  # [D, 2I] or [I, D]: this expert's bytes only
        if kind == "gate_up_proj":
            gate, up = w.chunk(2, dim=1)
            moe.load_expert_weight(expert, "up_gate_proj", torch.cat([up.t(), gate.t()]))
        else:
            moe.load_expert_weight(expert, "down_proj", w.t())


def _held_elsewhere(model, name: str) -> bool:
    """A tensor another pipeline stage holds."""
    block = BLOCK.match(name)
    if block:
        return block[1] not in model.transformer_blocks
    return name.startswith(("img_in.", "norm_out.", "proj_out."))


def load_checkpoint(model, checkpoint: SafetensorsCheckpoint) -> None:
    """Loads this rank's share of transformer/; CheckpointError names the file and the tensor."""
    specs = _specs(model)
    pending = set(specs)
    c = model.config
    for name in checkpoint.names():
        file = checkpoint.weight_map[name]
        block = BLOCK.match(name)
        if block and int(block[1]) >= c.num_layers:
            raise CheckpointError(f"{file}: tensor {name} is for block {block[1]}, but transformer/config.json has "
                                  f"num_layers={c.num_layers}")
        if SKIPPED.match(name):
            continue
        spec = specs.get(name)
        if spec is None:
            if _held_elsewhere(model, name):
                continue
            raise CheckpointError(f"{file}: unexpected tensor {name} (not part of the Nucleus-Image transformer "
                                  "that transformer/config.json describes)")
        shape, load = spec
        source = checkpoint.get(name)
        if source.get_shape() != shape:
            raise CheckpointError(f"{source.file}: tensor {name} has shape {source.get_shape()}, but "
                                  f"transformer/config.json implies {shape}")
        if source.get_dtype() not in HIGH_PRECISION_DTYPES:
            raise CheckpointError(f"{source.file}: tensor {name} is stored as {source.get_dtype()}; Nucleus-Image "
                                  "checkpoints are read in high precision")
        try:
            load(source)
        except ValueError as e:
            raise CheckpointError(f"{source.file}: tensor {name}: {e}") from None
        pending.discard(name)
    if pending:
        missing = sorted(pending)
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{checkpoint.model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}")
