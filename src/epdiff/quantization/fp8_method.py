"""FP8 as a quantization method (docs/architecture.md, 'Quantization'): `Fp8Config` and the
methods it hands to the layers.

What FP8 covers: the routed experts (96 % of HunyuanImage-3.0's weights and most of its FLOPs;
stored as float8 in a pre-quantized checkpoint) and the column-parallel dense projections
(attention's qkv_proj, the shared or dense MLP's up_gate_proj; quantized while loading, a
checkpoint keeps them in high precision). A column-parallel rank holds whole weight rows and the
whole input row, so per-channel and per-row scales are the same on every layout. Row-parallel
projections stay in the model dtype: a TP rank sees a slice of each row, so FP8 there would
quantize differently per TP size (and they gain least: BENCHMARKS.md, "FP8"). Router, norms,
embeddings and whatever else is no linear layer stay in bf16/fp32.

The numbers are quantization/fp8.py's; the expert GEMM inputs are quantized per row in the passes
that already touch them (the row gather, the SwiGLU), and the token rows travel to other ranks as
float8 codes with their row scales (half the bytes of bf16, the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels import moe as moe_kernels
from ..layers.activation import swiglu_up_gate
from ..loader.slicing import copy_checked, read_row_shard
from . import fp8
from .base import ExpertsMethod, LinearMethod, QuantizationConfig, UnquantizedLinearMethod, new_parameter

# The activation scale is computed per row on the fly; a checkpoint carries weight scales only.
ACTIVATION_SCHEMES = ("dynamic",)
SCALE_SUFFIX = "_scale"


def _checked_weight(value: torch.Tensor, name: str) -> torch.Tensor:
    if value.dtype == fp8.FP8_DTYPE:
        raise ValueError(f"{name}: float8 weights without their weight_scale")
    return value


class Fp8LinearMethod(LinearMethod):
    """float8 weight with one fp32 scale per output row (`weight_scale`), quantized as it is
    loaded; x quantized per row on the fly, or given so (fp8.Fp8Rows)."""

    takes_prepared_tokens = True

    def create_weights(self, layer, out_features, in_features, dtype, device):
        layer.weight = new_parameter((out_features, in_features), fp8.FP8_DTYPE, device, requires_grad=False)
        layer.weight_scale = new_parameter((out_features,), torch.float32, device, requires_grad=False)

    def load_weight(self, layer, value, name):
        q, scale = fp8.quantize_weight(_checked_weight(value, name).to(layer.weight.device))
        copy_checked(layer.weight, q, name)
        copy_checked(layer.weight_scale, scale, name + SCALE_SUFFIX)

    def apply(self, layer, x, bias=None):
        if isinstance(x, fp8.Fp8Rows):
            y = fp8.scaled_mm(x.q, x.scale, layer.weight, layer.weight_scale, x.dtype)
        else:
            y = fp8.linear(x, layer.weight, layer.weight_scale, x.dtype)
        return y if bias is None else y + bias


def quantize_tokens(x: torch.Tensor) -> fp8.Fp8Rows:
    """Row-wise FP8 of x [T, D]: the same numbers the expert path computes when it gathers and
    quantizes the rows itself."""
    return fp8.Fp8Rows(*fp8.quantize_activation(x), x.dtype)


def _weighted_activation_fp32(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The activation the FP8 path quantizes: in fp32, as the fused kernel computes it."""
    return swiglu_up_gate(fused.float()) * w.float()[:, None]


class Fp8ExpertsMethod(ExpertsMethod):
    """float8 expert weights with one fp32 scale per output channel per expert
    (`up_gate_proj_scale` [E, 2I], `down_proj_scale` [E, D]); both GEMM inputs quantized per row."""

    stored_dtype = fp8.SAFETENSORS_FP8
    stored_scale_suffix = SCALE_SUFFIX

    def create_weights(self, experts, shapes, dtype, device):
        for kind, shape in shapes.items():
            setattr(experts, kind, new_parameter(shape, fp8.FP8_DTYPE, device, requires_grad=False))
            setattr(experts, kind + SCALE_SUFFIX, new_parameter(shape[:2], torch.float32, device, requires_grad=False))

    def load_expert(self, experts, local, kind, value, scale, name):
        param = getattr(experts, kind)[local]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
        target_scale = getattr(experts, kind + SCALE_SUFFIX)[local]
        if scale is None:
            value, scale = fp8.quantize_weight(_checked_weight(value, name).to(param.device))
        elif value.dtype != fp8.FP8_DTYPE:
            raise ValueError(f"{name}: has a weight_scale but dtype {value.dtype}, expected float8_e4m3fn")
        scale = scale.reshape(-1)
        if scale.shape != target_scale.shape:
            raise ValueError(f"{name}: weight_scale has {scale.numel()} entries, expected {target_scale.numel()} "
                             "(one per output channel)")
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bad.any():  # a zero, negative or NaN scale would silently zero or poison the expert
            raise ValueError(f"{name}: weight_scale has {int(bad.sum())} entries that are not finite and "
                             f"positive (first: {scale[bad][0].item()})")
        with torch.no_grad():
            param.copy_(value)
            target_scale.copy_(scale)

    def stored_scale_layout(self, weight_shape):
        rows = weight_shape[0]
        return ((rows,), (rows, 1)), "F32"  # one scale per output channel

    def shard_stored_scale(self, scale, kind, rank, shards):
        if kind == "down_proj":
            return scale[:]  # its output rows are whole on every rank
        return read_row_shard(scale, rank, shards, parts=2 if kind == "up_gate_proj" else 1)

    def prepare_tokens(self, x):
        return quantize_tokens(x)

    def pack_tokens(self, x):
        rows = x if isinstance(x, fp8.Fp8Rows) else quantize_tokens(x)
        return rows.q.view(torch.uint8), rows.scale  # bytes: every backend moves them

    def unpack_tokens(self, rows, row_values, dtype):
        return fp8.Fp8Rows(rows.view(fp8.FP8_DTYPE), row_values[:, 0].contiguous(), dtype)

    def use_grouped_mm(self, experts, x):
        aligned = experts.hidden_size % 16 == 0 and experts.intermediate_size % 16 == 0
        return aligned and x.dtype == torch.bfloat16 and fp8.scaled_grouped_mm_supported(x.device)

    def grouped(self, experts, x, token, weight, offs):
        count = offs[-1:]
        fused = kernels.available(weight)
        if isinstance(x, fp8.Fp8Rows):
            hq = moe_kernels.gather_rows(x.q, token, count) if fused else x.q[token]
            hs = x.scale[token]
        elif fused:
            hq, hs = moe_kernels.gather_quant_rows(x, token, count)
        else:
            hq, hs = fp8.quantize_rows(x[token])
        g1 = fp8.scaled_grouped_mm(hq, hs, experts.up_gate_proj, experts.up_gate_proj_scale, offs, experts.dtype)
        aq, a_scale = (moe_kernels.swiglu_quant(g1, weight, count) if fused
                       else fp8.quantize_rows(_weighted_activation_fp32(g1, weight)))
        return fp8.scaled_grouped_mm(aq, a_scale, experts.down_proj, experts.down_proj_scale, offs, experts.dtype)

    def expert(self, experts, e, x, rows, weight):
        hq, hs = (x.q[rows], x.scale[rows]) if isinstance(x, fp8.Fp8Rows) else fp8.quantize_rows(x[rows])
        g1 = fp8.scaled_mm(hq, hs, experts.up_gate_proj[e], experts.up_gate_proj_scale[e], experts.dtype)
        aq, a_scale = fp8.quantize_rows(_weighted_activation_fp32(g1, weight))
        return fp8.scaled_mm(aq, a_scale, experts.down_proj[e], experts.down_proj_scale[e], experts.dtype)

    def gemm_input_bytes(self, act_bytes):
        return 1, 4  # float8 codes and an fp32 scale per row


@dataclass(frozen=True)
class Fp8Config(QuantizationConfig):
    """float8_e4m3fn routed experts (one fp32 scale per output channel per expert) and
    column-parallel dense projections (one per output channel); activations quantized per token
    on the fly."""

    activation_scheme: str = "dynamic"
    name = "fp8"

    def linear_method(self, row_parallel):
        return UnquantizedLinearMethod() if row_parallel else Fp8LinearMethod()

    def experts_method(self):
        return Fp8ExpertsMethod()

    def checkpoint_config(self) -> dict:
        """vLLM's keys for its fp8 method (quant_method, activation_scheme), plus which modules hold
        float8 tensors and how their scales run. vLLM's fp8 method itself expects per-tensor or
        block scales, so it would not load these per-channel ones as they are."""
        return {"quant_method": self.name, "activation_scheme": self.activation_scheme, "fmt": "e4m3",
                "weight_scale_granularity": "channel", "quantized_modules": ["mlp.experts"]}

    @classmethod
    def from_checkpoint_config(cls, qc, where):
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(f"{where}: quantization_config.activation_scheme {scheme!r} is not supported; "
                             f"supported: {', '.join(ACTIVATION_SCHEMES)}")
        granularity = qc.get("weight_scale_granularity", "channel")
        if granularity != "channel":
            raise ValueError(f"{where}: quantization_config.weight_scale_granularity {granularity!r} is not "
                             "supported; supported: channel")
        if qc.get("weight_block_size") is not None:
            raise ValueError(f"{where}: quantization_config.weight_block_size {qc['weight_block_size']!r}: "
                             "block-wise FP8 is not supported (per-channel scales only)")
        return cls(activation_scheme=scheme)

    def quantize_stored_weight(self, w):
        q, scale = fp8.quantize_weight(w)
        return {"": q, SCALE_SUFFIX: scale[:, None]}
