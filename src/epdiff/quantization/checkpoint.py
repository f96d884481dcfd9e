"""`epdiff quantize`: a pre-quantized copy of a safetensors checkpoint, for any family.

The family says which tensors are routed expert weights; the quantization config says what a
pre-quantized checkpoint stores for each (quantize_stored_weight). Shard by shard, tensor by
tensor: memory holds one shard's output, never the model."""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

from ..loader.safetensors_loader import CheckpointError, SafetensorsCheckpoint, save_tensors
from .base import QuantizationConfig


def write_quantized_checkpoint(model_dir: str, out_dir: str, config: QuantizationConfig,
                               is_expert_weight: Callable[[str], bool], device="cpu") -> dict:
    """Routed expert weights (is_expert_weight(name)) become what config stores for them; every
    other tensor and file is copied, and config.json gains `quantization_config`. Returns a summary."""
    if config is None:
        raise ValueError("give a quantization scheme to write (--quantization)")
    with open(os.path.join(model_dir, "config.json")) as f:
        if json.load(f).get("quantization_config") is not None:
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
            if is_expert_weight(name):
                if t.dim() != 2:
                    raise CheckpointError(f"{file}: tensor {name} has shape {tuple(t.shape)}, expected a matrix")
                for suffix, stored in config.quantize_stored_weight(t.to(device)).items():
                    tensors[name + suffix] = stored.cpu()
                quantized += 1
            else:
                tensors[name] = t
        save_tensors(tensors, os.path.join(out_dir, file))
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
            raw["quantization_config"] = config.checkpoint_config()
            with open(os.path.join(out_dir, entry), "w") as f:
                json.dump(raw, f, indent=2)
        else:
            shutil.copy2(src, os.path.join(out_dir, entry))
    return dict(out_dir=out_dir, quantized_tensors=quantized, bytes_in=bytes_in, bytes_out=bytes_out)
