"""FP8 (float8_e4m3fn) numerics: weights per output channel, activations per row, dynamically.

    w ≈ q_w · s_w[channel]          quantize_weight: once, at load time
    x ≈ q_x · s_x[row]              quantize_rows: on the fly, every forward
    x·wᵀ ≈ (q_x·q_wᵀ) · s_x[:, None] · s_w[None, :]

A scale is the row's (channel's) absolute maximum over 448, the largest finite e4m3fn value, so
the largest element lands on 448 exactly and nothing saturates. Scales are fp32, and what is
stored is the dequantizing multiplier (vLLM's `weight_scale` convention).

The GEMMs: `torch._scaled_grouped_mm` (Hopper, the routed experts) and `torch._scaled_mm` (the
dense case). Where the fused kernel does not exist (CPU, pre-Hopper GPUs), `*_fallback` computes
the same product in fp32 from the fp8 operands: fp8×fp8 products are exact in fp32, so it
differs from the tensor-core result only by summation order and the final rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels import moe as moe_kernels
from ..kernels.moe import FP8_DTYPE, FP8_MAX, MIN_AMAX
# safetensors' name of the dtype, for checkpoint headers.
SAFETENSORS_FP8 = "F8_E4M3"


@dataclass
class Fp8Rows:
    """Token rows already in FP8 (FP8 dispatch sends these): codes [R, D], scales [R], and the
    dtype the rows stand for (what the expert outputs come back in)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    def __getitem__(self, rows) -> "Fp8Rows":
        return Fp8Rows(self.q[rows], self.scale[rows], self.dtype)


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return amax.float().clamp_min(MIN_AMAX) / FP8_MAX


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # The clamp only catches the last ulp of the division: by construction |x / scale| <= 448.
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (one row per output channel) -> (q [..., N, K] fp8, scale [..., N] fp32)."""
    scale = _scale_from_amax(w.abs().amax(dim=-1))
    return _to_fp8(w, scale[..., None]), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] fp8, scale [M] fp32): one scale per row (token). The same
    arithmetic as the fused Triton kernels in kernels/moe.py, which the GPU tests compare to."""
    return quantize_weight(x)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows, in one fused pass where the Triton kernels run (CUDA inference)."""
    if kernels.available(x):
        return moe_kernels.quantize_rows(x)
    return quantize_rows(x)


def linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] · wᵀ for FP8 weights w [N, K] (per-channel scales): x quantized per row."""
    flat = x.reshape(-1, x.shape[-1])
    q, scale = quantize_activation(flat)
    return scaled_mm(q, scale, w_q, w_scale, out_dtype).view(*x.shape[:-1], w_q.shape[0])


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., N, K], scale [..., N] -> q · scale in `dtype`."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def scaled_mm_fallback(a_q, a_scale, w_q, w_scale, out_dtype) -> torch.Tensor:
    """a [M, K] fp8 with [M] scales, w [N, K] fp8 with [N] scales -> (a·wᵀ) [M, N] in out_dtype."""
    acc = a_q.float() @ w_q.float().t()
    return (acc * a_scale.float()[:, None] * w_scale.float()[None, :]).to(out_dtype)


def scaled_mm(a_q, a_scale, w_q, w_scale, out_dtype) -> torch.Tensor:
    """Dense FP8 GEMM with row-wise scales on both sides (a [M, K], w [N, K])."""
    aligned = a_q.shape[1] % 16 == 0 and w_q.shape[0] % 16 == 0  # the fused kernel's 16-byte rows
    if aligned and out_dtype == torch.bfloat16 and scaled_mm_supported(a_q.device):
        return torch._scaled_mm(a_q, w_q.t(), scale_a=a_scale.float()[:, None].contiguous(),
                                scale_b=w_scale.float()[None, :].contiguous(), out_dtype=out_dtype,
                                use_fast_accum=True)
    return scaled_mm_fallback(a_q, a_scale, w_q, w_scale, out_dtype)


def scaled_grouped_mm_fallback(a_q, a_scale, w_q, w_scale, offs, out_dtype) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of a (sorted by expert) times expert e's wᵀ; rows past offs[-1]
    are zero. a [P, K] fp8, a_scale [P]; w [E, N, K] fp8, w_scale [E, N]; offs [E] int32
    (cumulative). Reads offs on the host: a sync on a GPU, which only the fallback pays."""
    out = torch.zeros(a_q.shape[0], w_q.shape[1], dtype=out_dtype, device=a_q.device)
    bounds = [0] + offs.tolist()
    for e in range(w_q.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi] = scaled_mm_fallback(a_q[lo:hi], a_scale[lo:hi], w_q[e], w_scale[e], out_dtype)
    return out


def scaled_grouped_mm(a_q, a_scale, w_q, w_scale, offs, out_dtype) -> torch.Tensor:
    """The expert GEMM: `torch._scaled_grouped_mm` where it runs, else the fp32 fallback. Rows
    past offs[-1] are left unwritten on the fused path."""
    if scaled_grouped_mm_supported(a_q.device) and out_dtype == torch.bfloat16:
        # B must be column-major: the [E, N, K] weights viewed as [E, K, N] are exactly that.
        return torch._scaled_grouped_mm(a_q, w_q.transpose(-2, -1), a_scale, w_scale, offs=offs,
                                        out_dtype=out_dtype, use_fast_accum=True)
    return scaled_grouped_mm_fallback(a_q, a_scale, w_q, w_scale, offs, out_dtype)


def scaled_grouped_mm_supported(device: torch.device) -> bool:
    """Hopper (compute capability 9.x): the row-wise FP8 grouped kernel exists there only."""
    return (hasattr(torch, "_scaled_grouped_mm") and torch.device(device).type == "cuda"
            and torch.cuda.get_device_capability(device)[0] == 9)


def scaled_mm_supported(device: torch.device) -> bool:
    """Row-wise `torch._scaled_mm` on CUDA needs compute capability 8.9 or newer."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
