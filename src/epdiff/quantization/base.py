"""The quantization seam (docs/architecture.md, 'Quantization'), as vLLM's `quant_method`.

A `QuantizationConfig` is chosen once per engine and hands each layer that has a quantized form a
method object: a linear layer gets a `LinearMethod`, the routed experts an `ExpertsMethod`. The
method creates the layer's parameters, loads a checkpoint tensor (with its scales, where the
checkpoint stores them), and computes the layer's product; the layers call it and never ask which
scheme it is. Without quantization the layers get the unquantized methods below.

The layers' logical weights are the same whatever the method: a linear layer's `weight` [N, K]
(this rank's part), the experts' fused `up_gate_proj` [E, 2I, D] and `down_proj` [E, D, I]. A
method may store them in another dtype and add tensors beside them (`<name>_scale`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import moe as moe_kernels
from ..layers.activation import swiglu_up_gate
from ..loader.slicing import copy_checked

def new_parameter(shape, dtype, device, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=requires_grad)


class LinearMethod(ABC):
    """How a linear layer holds and applies its weight ([out, in], this rank's part)."""

    # Whether `apply` also takes its input as the routed experts' method prepared it
    # (ExpertsMethod.prepare_tokens), so the MoE quantizes its input once for both.
    takes_prepared_tokens = False

    @abstractmethod
    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype, device) -> None:
        """Registers `layer.weight` (and whatever the method keeps beside it)."""

    @abstractmethod
    def load_weight(self, layer: nn.Module, value: torch.Tensor, name: str) -> None:
        """This rank's part of the weight, in high precision (a quantizing method quantizes it here)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] -> [..., out]."""


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer, out_features, in_features, dtype, device):
        layer.weight = new_parameter((out_features, in_features), dtype, device)

    def load_weight(self, layer, value, name):
        copy_checked(layer.weight, value, name)

    def apply(self, layer, x, bias=None):
        return F.linear(x, layer.weight, bias)


class ExpertsMethod(ABC):
    """How the routed experts hold their weights, which form the token rows travel in to them,
    and how a group of experts computes its rows.

    The expert input a method receives is `x` as its dispatch left it: the tokens themselves
    (no dispatch) or what `unpack_tokens` made of the rows that travelled."""

    # A pre-quantized checkpoint's expert weights: their safetensors dtype, and the suffix of the
    # tensor stored beside each (its scale); None for a method that stores no checkpoint of its own.
    stored_dtype: str | None = None
    stored_scale_suffix: str | None = None

    @abstractmethod
    def create_weights(self, experts: nn.Module, shapes: dict[str, tuple[int, ...]], dtype, device) -> None:
        """Registers each logical weight (`shapes`: name -> its shape, GroupedExperts.weight_shapes:
        `up_gate_proj` [E, 2I, D], `down_proj` [E, D, I]) and the method's own."""

    @abstractmethod
    def load_expert(self, experts: nn.Module, local: int, kind: str, value: torch.Tensor,
                    scale: torch.Tensor | None, name: str) -> None:
        """One expert's `kind` weight ([N, K], this rank's part): high precision, or as a
        pre-quantized checkpoint stores it with its `scale`."""

    def stored_scale_layout(self, weight_shape: tuple[int, int]) -> tuple[tuple[tuple[int, ...], ...], str]:
        """(the shapes a pre-quantized checkpoint may store a weight's scale in, its safetensors dtype)."""
        raise NotImplementedError(f"{type(self).__name__} stores no scales")

    def shard_stored_scale(self, scale, kind: str, rank: int, shards: int) -> torch.Tensor:
        """This TP rank's part of a stored scale (a tensor or a safetensors slice) of an expert weight
        whose output rows shard over TP (`up_gate_proj`: each half's rows; `down_proj`: none)."""
        raise NotImplementedError(f"{type(self).__name__} stores no scales")

    def prepare_tokens(self, x: torch.Tensor):
        """The MoE input [T, D] in the form the experts compute from (quantized once, for the routed
        experts and for a shared expert whose method `takes_prepared_tokens`); indexing its rows
        gives those rows in that form."""
        return x

    def pack_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What travels to the experts' ranks for the rows of x: (rows, values per row [T] or [T, m],
        or None)."""
        return x, None

    def unpack_tokens(self, rows: torch.Tensor, row_values: torch.Tensor | None, dtype: torch.dtype):
        """The expert input made of rows (and their values per row, [R, m]) received from other ranks."""
        return rows

    @abstractmethod
    def use_grouped_mm(self, experts: nn.Module, x) -> bool:
        """Whether the grouped GEMM path has a kernel here (else the per-expert loop runs)."""

    @abstractmethod
    def grouped(self, experts: nn.Module, x, token: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor
                ) -> torch.Tensor:
        """Pair rows sorted by expert -> their weighted outputs [C, D]. Pair row r is token
        token[r] of x with routing weight weight[r]; offs [E] (int32, cumulative) ends each
        expert's rows; rows past offs[-1] may be left unwritten. No host sync."""

    def equal_groups(self, experts: nn.Module, x, token: torch.Tensor, weight: torch.Tensor, rows_per_expert: int
                     ) -> torch.Tensor:
        """`grouped` where every local expert has rows_per_expert rows (expert choice), known on
        the host: a method may take a batched GEMM for it."""
        offs = torch.arange(1, experts.num_local_experts + 1, dtype=torch.int32, device=token.device) * rows_per_expert
        return self.grouped(experts, x, token, weight, offs)

    @abstractmethod
    def expert(self, experts: nn.Module, e: int, x, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Local expert e on tokens x[rows], weighted: [len(rows), D] (the loop path)."""

    def gemm_input_bytes(self, act_bytes: int) -> tuple[int, int]:
        """(bytes per element, extra bytes per row) of the GEMM inputs the expert path keeps."""
        return act_bytes, 0


def weighted_activation(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # down_proj is linear, so the routing weight can scale its (narrower) input instead of its output.
    return (swiglu_up_gate(fused).float() * w[:, None]).to(fused.dtype)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Where torch's grouped GEMM has a fast kernel: Hopper or newer, bf16."""
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0))


class UnquantizedExpertsMethod(ExpertsMethod):
    def create_weights(self, experts, shapes, dtype, device):
        for kind, shape in shapes.items():
            setattr(experts, kind, new_parameter(shape, dtype, device))

    def load_expert(self, experts, local, kind, value, scale, name):
        if scale is not None or not value.is_floating_point() or value.element_size() < 2:
            raise ValueError(f"{name}: a quantized checkpoint tensor ({value.dtype}) needs the checkpoint's "
                             "quantization (--quantization)")
        copy_checked(getattr(experts, kind)[local], value, name)

    def use_grouped_mm(self, experts, x):
        return grouped_mm_supported(x.device, x.dtype)

    def grouped(self, experts, x, token, weight, offs):
        up_gate, down = experts.up_gate_proj.transpose(-2, -1), experts.down_proj.transpose(-2, -1)
        if kernels.available(weight):
            count = offs[-1:]
            h = moe_kernels.gather_rows(x, token, count)
            return grouped_mm(moe_kernels.swiglu(grouped_mm(h, up_gate, offs), weight, count), down, offs)
        return grouped_mm(weighted_activation(grouped_mm(x[token], up_gate, offs), weight), down, offs)

    def equal_groups(self, experts, x, token, weight, rows_per_expert):
        if not kernels.available(weight):
            return super().equal_groups(experts, x, token, weight, rows_per_expert)
        # Equal groups are a batch of GEMMs: cuBLAS's batched kernel (BENCHMARKS.md §25).
        E = experts.num_local_experts
        h = x.index_select(0, token).view(E, rows_per_expert, -1)  # every row is a pair: no count to stop at
        a = moe_kernels.swiglu(torch.bmm(h, experts.up_gate_proj.transpose(-2, -1)).flatten(0, 1), weight)
        return torch.bmm(a.view(E, rows_per_expert, -1), experts.down_proj.transpose(-2, -1)).flatten(0, 1)

    def expert(self, experts, e, x, rows, weight):
        part = x[rows]
        return weighted_activation(part @ experts.up_gate_proj[e].t(), weight) @ experts.down_proj[e].t()


class QuantizationConfig(ABC):
    """One quantization scheme, chosen once per engine (`--quantization NAME`)."""

    name: str

    @abstractmethod
    def linear_method(self, row_parallel: bool) -> LinearMethod:
        """The method of a column-parallel (False) or row-parallel (True) linear layer."""

    @abstractmethod
    def experts_method(self) -> ExpertsMethod:
        """The method of the routed experts."""

    @abstractmethod
    def checkpoint_config(self) -> dict:
        """`quantization_config` of a pre-quantized checkpoint's config.json."""

    @classmethod
    @abstractmethod
    def from_checkpoint_config(cls, qc: dict, where: str) -> "QuantizationConfig":
        """Validates a checkpoint's `quantization_config`; `where` names the file in errors."""

    @abstractmethod
    def quantize_stored_weight(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a pre-quantized checkpoint stores for a routed expert weight w [N, K]: suffix ->
        tensor ('' is the weight itself)."""
