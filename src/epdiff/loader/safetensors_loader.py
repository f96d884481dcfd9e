"""A Hugging Face style safetensors checkpoint, read tensor by tensor and slice by slice.

Both layouts load: `model.safetensors.index.json` with shards (the release) and a single
`model.safetensors` (what `save_pretrained` writes for a small model). Nothing is read until a
caller indexes a tensor's slice, and every read is counted, so a rank's I/O can be checked.
"""

from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open

from ..quantization import STORED_DTYPES

HIGH_PRECISION_DTYPES = ("BF16", "F16", "F32", "F64")
# Besides these, a pre-quantized checkpoint's quantized weights (the model loader decides where
# they may appear).
CHECKPOINT_DTYPES = HIGH_PRECISION_DTYPES + STORED_DTYPES


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """A safetensors file readable like every other file written (safetensors itself makes it 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the tensor."""


def _check_complete(path: str):
    """The header promises data up to some offset: a shorter file was cut off (a reader would
    crash with SIGBUS on the mapped bytes instead of raising)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > size:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated: its header describes {8 + header_len + end} bytes, "
                              f"the file has {size}")


class TrackedSlice:
    """A lazy view of one tensor on disk. Indexing reads only the indexed part, and counts it."""

    def __init__(self, checkpoint: "SafetensorsCheckpoint", name: str, file: str, raw):
        self.checkpoint, self.name, self.file, self.raw = checkpoint, name, file, raw

    def get_shape(self) -> tuple[int, ...]:
        return tuple(self.raw.get_shape())

    @property
    def shape(self):
        return self.get_shape()

    def get_dtype(self) -> str:
        return self.raw.get_dtype()

    def __getitem__(self, index) -> torch.Tensor:
        try:
            t = self.raw[index]
        except Exception as e:  # a truncated or damaged data section
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name}: {e}") from None
        self.checkpoint.bytes_read += t.numel() * t.element_size()
        self.checkpoint.tensors_read.add(self.name)
        return t

    def full(self) -> torch.Tensor:
        return self[:] if self.get_shape() else self[...]


class SafetensorsCheckpoint:
    def __init__(self, model_dir: str, weights_name: str = "model"):
        """weights_name: the files' stem (transformers' `model`, diffusers' `diffusion_pytorch_model`)."""
        self.model_dir = model_dir
        self.bytes_read = 0
        self.tensors_read: set[str] = set()
        self._handles = {}
        index_path = os.path.join(model_dir, f"{weights_name}.safetensors.index.json")
        single = os.path.join(model_dir, f"{weights_name}.safetensors")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self.weight_map = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: not a safetensors index ({e})") from None
        elif os.path.isfile(single):
            file = os.path.basename(single)
            self.weight_map = {name: file for name in self._open(file).keys()}
        else:
            raise CheckpointError(f"{model_dir}: neither {os.path.basename(index_path)} nor {os.path.basename(single)} "
                                  "found")
        for file in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(model_dir, file)):
                example = next(n for n, f in self.weight_map.items() if f == file)
                raise CheckpointError(f"missing shard {file} (listed in the index for {example} and others) "
                                      f"in {model_dir}")
        for file in sorted(set(self.weight_map.values())):  # headers only: cheap, and before any compute
            _check_complete(os.path.join(model_dir, file))

    def _open(self, file: str):
        if file not in self._handles:
            path = os.path.join(self.model_dir, file)
            try:
                self._handles[file] = safe_open(path, framework="pt", device="cpu")
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> TrackedSlice:
        file = self.weight_map[name]
        handle = self._open(file)
        try:
            raw = handle.get_slice(name)
        except Exception:
            raise CheckpointError(f"{file}: tensor {name} is listed in the index but not stored in the file") from None
        ts = TrackedSlice(self, name, file, raw)
        if ts.get_dtype() not in CHECKPOINT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {ts.get_dtype()}, expected a float type "
                                  f"({', '.join(CHECKPOINT_DTYPES)})")
        return ts
