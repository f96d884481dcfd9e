"""Quantization, chosen once and handed to the layers that have a quantized form (vLLM's
`quant_config` pattern): `get_quantization_config("fp8")` -> an `Fp8Config`, passed down from
`load_model` to the MoE layers, whose routed experts then hold float8 weights.

What FP8 covers: the routed experts (96 % of HunyuanImage-3.0's weights and most of its FLOPs;
stored as float8 in a pre-quantized checkpoint) and the column-parallel dense projections,
attention's qkv_proj and the shared (or dense) MLP's up_gate_proj (quantized while loading; a
checkpoint keeps them in high precision). A column-parallel rank holds whole weight rows and the
whole input row, so per-channel and per-row scales are the same on every layout. The
row-parallel o_proj and down_proj stay in the model dtype: a TP rank sees a slice of each row, so
FP8 there would quantize differently per TP size (and they gain least: BENCHMARKS.md, "FP8").
Router, norms, embeddings, the UNet blocks and the VAE stay in bf16/fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATION_METHODS = ("fp8",)
# The activation scale is computed per row on the fly; a checkpoint carries weight scales only.
ACTIVATION_SCHEMES = ("dynamic",)


@dataclass(frozen=True)
class Fp8Config:
    """float8_e4m3fn routed experts (one fp32 scale per output channel per expert) and
    column-parallel dense projections (one per output channel); activations quantized per token
    on the fly (for the experts, in the pass that gathers their rows)."""

    activation_scheme: str = "dynamic"
    name: str = "fp8"

    def checkpoint_config(self) -> dict:
        """`quantization_config` of a pre-quantized checkpoint's config.json: vLLM's keys for its
        fp8 method (quant_method, activation_scheme), plus which modules hold float8 tensors and
        how their scales run. vLLM's fp8 method itself expects per-tensor or block scales, so it
        would not load these per-channel ones as they are."""
        return {"quant_method": "fp8", "activation_scheme": self.activation_scheme, "fmt": "e4m3",
                "weight_scale_granularity": "channel", "quantized_modules": ["mlp.experts"]}

    @classmethod
    def from_checkpoint_config(cls, qc, where: str) -> "Fp8Config":
        """Validates a checkpoint's `quantization_config`; `where` names the file in errors."""
        if not isinstance(qc, dict):
            raise ValueError(f"{where}: quantization_config must be an object, got {qc!r}")
        method = qc.get("quant_method")
        if method not in QUANTIZATION_METHODS:
            raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; "
                             f"supported: {', '.join(QUANTIZATION_METHODS)}")
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


QuantizationConfig = Fp8Config  # the one method so far; a second one adds a common base


def get_quantization_config(name: str | None) -> QuantizationConfig | None:
    """`--quantization NAME` -> its config; None -> None (no quantization)."""
    if name is None:
        return None
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {name!r} is not supported; choose one of {', '.join(QUANTIZATION_METHODS)}")
    return Fp8Config()


__all__ = ["QUANTIZATION_METHODS", "Fp8Config", "QuantizationConfig", "get_quantization_config"]
