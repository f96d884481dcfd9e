"""Quantization, chosen once per engine and handed to the layers as method objects (vLLM's
`quant_config` / `quant_method` pattern; docs/architecture.md, 'Quantization').

    config = get_quantization_config("fp8")          # None: no quantization
    layer.quant_method = linear_method(config, row_parallel=False)

`QUANTIZATION_METHODS` is the registry: `--quantization NAME` and a pre-quantized checkpoint's
`quantization_config.quant_method` both name an entry. Adding a scheme: its config and methods in
a module here, one line below, and its kernels in `kernels/`.
"""

from __future__ import annotations

from .base import (ExpertsMethod, LinearMethod, QuantizationConfig, UnquantizedExpertsMethod,
                   UnquantizedLinearMethod)
from .fp8_method import Fp8Config

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {"fp8": Fp8Config}
# The safetensors dtypes a pre-quantized checkpoint of some registered scheme may hold.
STORED_DTYPES = tuple(sorted({d for d in (c().experts_method().stored_dtype for c in QUANTIZATION_METHODS.values())
                              if d is not None}))


def get_quantization_config(name: str | None) -> QuantizationConfig | None:
    """`--quantization NAME` -> its config; None -> None (no quantization)."""
    if name is None:
        return None
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization {name!r} is not supported; choose one of {', '.join(QUANTIZATION_METHODS)}")
    return QUANTIZATION_METHODS[name]()


def config_from_checkpoint(qc, where: str) -> QuantizationConfig:
    """A pre-quantized checkpoint's `quantization_config`, validated; `where` names the file."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{where}: quantization_config.quant_method {method!r} is not supported; "
                         f"supported: {', '.join(QUANTIZATION_METHODS)}")
    return QUANTIZATION_METHODS[method].from_checkpoint_config(qc, where)


def linear_method(config: QuantizationConfig | None, row_parallel: bool) -> LinearMethod:
    return UnquantizedLinearMethod() if config is None else config.linear_method(row_parallel)


def experts_method(config: QuantizationConfig | None) -> ExpertsMethod:
    return UnquantizedExpertsMethod() if config is None else config.experts_method()


__all__ = ["QUANTIZATION_METHODS", "STORED_DTYPES", "ExpertsMethod", "Fp8Config", "LinearMethod", "QuantizationConfig",
           "config_from_checkpoint", "experts_method", "get_quantization_config", "linear_method"]
