"""This rank's experts and their grouped compute (docs/architecture.md, 'The MoE block').

w13[e] is expert e's fused input projection [2I, D], the *up* half first and the gate half
second (HunyuanImage-3.0's order); w2[e] is its down projection [D, I].

With an `Fp8Config` the weights are float8_e4m3fn with one fp32 scale per output channel
(w13_scale [E, 2I], w2_scale [E, D]), and the two GEMM inputs are quantized per row on the fly:
the token rows in the pass that gathers them, the activation in the SwiGLU pass.

The grouped path's buffers hold the (token, expert) pairs in chunks sized from the number of
rows (known on the host once per request, from the token-group counts): a chunk is
CHUNK_CAPACITY × this rank's even share of the pairs, and as many chunks run as the worst case
needs. Which of them hold pairs only the device knows, so every chunk is launched and the kernels
stop at the device-side count: no host sync, and the memory shrinks with EP (E_local / E).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import moe as moe_kernels
from ..layers.mlp import swiglu_up_gate
from ..quantization import Fp8Config
from ..quantization import fp8

EXPERT_KERNELS = ("auto", "grouped_mm", "loop")
# Rank imbalance of real (and dummy) routing stays well under 1.5× the even share (BENCHMARKS.md:
# up to 1.35 on the release's dummy weights), so one chunk usually holds a rank's pairs; a busier
# rank runs a second one. Each extra (empty) chunk costs a few launches.
CHUNK_CAPACITY = 1.5
CHUNK_ALIGN = 128


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Where torch's grouped GEMM has a fast kernel: Hopper or newer, bf16."""
    if not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
        return False
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offs)


def expert_chunks(num_rows: int, top_k: int, num_local_experts: int, num_experts: int) -> tuple[int, int]:
    """(pair rows per chunk, chunks) of the grouped path for num_rows tokens. A token picks each
    local expert at most once, so a rank computes at most num_rows·min(k, E_local) pairs."""
    most = num_rows * min(top_k, num_local_experts)
    if most == 0:
        return 0, 0
    even = num_rows * top_k * num_local_experts / num_experts
    rows = min(most, CHUNK_ALIGN * math.ceil(CHUNK_CAPACITY * even / CHUNK_ALIGN))
    return rows, math.ceil(most / rows)


def expert_buffer_bytes(chunk_rows: int, hidden: int, inter: int, act_bytes: int = 2, fp8_weights: bool = False) -> int:
    """Peak bytes of one chunk on the grouped path: the gathered rows and the activation stay
    alive while the first GEMM's output (during SwiGLU) or the second GEMM's output exists. FP8
    GEMM inputs are 1 byte per element plus a 4-byte scale per row."""
    gemm_in, scales = (1, 4) if fp8_weights else (act_bytes, 0)
    gathered, activation = hidden * gemm_in + scales, inter * gemm_in + scales
    return chunk_rows * (gathered + activation + max(2 * inter, hidden) * act_bytes)


def quantize_tokens(x: torch.Tensor) -> fp8.Fp8Rows:
    """Row-wise FP8 of x [T, D] (for FP8 dispatch): the same numbers the expert path computes
    when it gathers and quantizes the rows itself."""
    return fp8.Fp8Rows(*fp8.quantize_activation(x), x.dtype)


class GroupedExperts(nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype = torch.float32, device=None, kernel: str = "auto",
                 num_experts: int | None = None, quant_config: Fp8Config | None = None):
        """num_experts: the global count (sizes the chunks; default: all are local)."""
        super().__init__()
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"unknown expert kernel {kernel!r}; choose one of {EXPERT_KERNELS}")
        if quant_config is not None and not isinstance(quant_config, Fp8Config):
            raise ValueError(f"GroupedExperts has no quantized form for {quant_config!r}")
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts or num_local_experts
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.kernel, self.dtype = kernel, dtype
        self.quant_config = quant_config
        self.fp8 = quant_config is not None
        weight_dtype = fp8.FP8_DTYPE if self.fp8 else dtype

        def param(*shape, dtype=weight_dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=not self.fp8)

        self.w13 = param(num_local_experts, 2 * intermediate_size, hidden_size)
        self.w2 = param(num_local_experts, hidden_size, intermediate_size)
        if self.fp8:
            self.w13_scale = param(num_local_experts, 2 * intermediate_size, dtype=torch.float32)
            self.w2_scale = param(num_local_experts, hidden_size, dtype=torch.float32)

    # -- weights ------------------------------------------------------------------------------

    def load_expert(self, local: int, kind: str, value: torch.Tensor, scale: torch.Tensor | None = None,
                    name: str = "expert"):
        """Copies one expert's w13 or w2 ([N, K], this rank's slice). FP8 experts take either a
        high-precision value (quantized here, per output channel) or float8 codes with their
        [N] scales (a pre-quantized checkpoint)."""
        param = {"w13": self.w13, "w2": self.w2}[kind][local]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not fit parameter {tuple(param.shape)}")
        with torch.no_grad():
            if not self.fp8:
                if scale is not None or value.dtype == fp8.FP8_DTYPE:
                    raise ValueError(f"{name}: a float8 checkpoint tensor needs --quantization fp8")
                param.copy_(value)
                return
            target_scale = getattr(self, f"{kind}_scale")[local]
            if scale is None:
                if value.dtype == fp8.FP8_DTYPE:
                    raise ValueError(f"{name}: float8 weights without their weight_scale")
                value, scale = fp8.quantize_weight(value.to(param.device))
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
            param.copy_(value)
            target_scale.copy_(scale)

    # -- compute ------------------------------------------------------------------------------

    def _use_grouped_mm(self, x) -> bool:
        if self.kernel != "auto":
            return self.kernel == "grouped_mm"
        if self.fp8:
            aligned = self.hidden_size % 16 == 0 and self.intermediate_size % 16 == 0
            return aligned and x.dtype == torch.bfloat16 and fp8.scaled_grouped_mm_supported(x.device)
        return grouped_mm_supported(x.device, x.dtype)

    def forward(self, x, local_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [R, D] (or its rows already in FP8, `Fp8Rows`, from FP8 dispatch); local_ids [R, k]
        (local expert index, -1 = not here); weights [R, k].

        Returns (y [R, D] = Σ_j weights[r, j]·expert_{local_ids[r, j]}(x[r]) over local j,
        tokens per local expert [E_local]).
        """
        R, k = local_ids.shape
        flat = local_ids.flatten()
        # Sort the (token, slot) pairs by local expert; pairs for other ranks sort last.
        key = torch.where(flat >= 0, flat, self.num_local_experts)
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(self.num_local_experts + 1, dtype=torch.int64, device=flat.device)
        counts = counts.index_add_(0, key, torch.ones_like(key))[:-1]
        if R == 0:
            return torch.zeros(0, self.hidden_size, dtype=self.dtype, device=flat.device), counts
        w = weights.flatten()[order]
        if self._use_grouped_mm(x):
            return self._forward_grouped(x, order, w, counts, k), counts
        return self._forward_loop(x, order, w, counts, k), counts

    def _forward_grouped(self, x, order, w, counts, k):
        """No host sync: chunk sizes come from R (host), the local pair count stays on the device."""
        P = order.numel()
        R = P // k
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        num_pairs = offs[-1:]
        pair = torch.arange(P, device=order.device)
        slot_to_row = torch.empty_like(order)
        slot_to_row[order] = torch.where(pair < num_pairs, pair, -1)
        token = order // k  # the token of each sorted pair
        rows, chunks = expert_chunks(R, k, self.num_local_experts, self.num_experts)
        out = None
        for c in range(chunks):
            lo, hi = c * rows, min(P, (c + 1) * rows)
            y = self._chunk(x, token[lo:hi], w[lo:hi], (offs - lo).clamp_(0, hi - lo))
            out = self._combine(out, y, lo, token, slot_to_row, num_pairs, R, k)
            del y  # before the next chunk allocates its own
        return out

    def _chunk(self, x, token, w, offs):
        """Pair rows of one chunk (sorted by expert; offs: cumulative rows per expert) -> their
        weighted expert outputs [C, D]; rows past offs[-1] are not computed."""
        count = offs[-1:]
        fused = kernels.available(w)
        if not self.fp8:
            w13, w2 = self.w13.transpose(-2, -1), self.w2.transpose(-2, -1)
            if fused:
                h = moe_kernels.gather_rows(x, token, count)
                return _grouped_mm(moe_kernels.swiglu(_grouped_mm(h, w13, offs), w, count), w2, offs)
            return _grouped_mm(self._weighted_activation(_grouped_mm(x[token], w13, offs), w), w2, offs)
        if isinstance(x, fp8.Fp8Rows):
            hq = moe_kernels.gather_rows(x.q, token, count) if fused else x.q[token]
            hs = x.scale[token]
        elif fused:
            hq, hs = moe_kernels.gather_quant_rows(x, token, count)
        else:
            hq, hs = fp8.quantize_rows(x[token])
        g1 = fp8.scaled_grouped_mm(hq, hs, self.w13, self.w13_scale, offs, self.dtype)
        aq, a_scale = (moe_kernels.swiglu_quant(g1, w, count) if fused
                       else fp8.quantize_rows(self._weighted_activation_fp32(g1, w)))
        return fp8.scaled_grouped_mm(aq, a_scale, self.w2, self.w2_scale, offs, self.dtype)

    def _forward_loop(self, x, order, w, counts, k):
        """Per-expert matmuls, sized on the host (free on CPU; one sync on a GPU)."""
        sizes = counts.tolist()
        n = sum(sizes)
        token = order[:n] // k
        outs = []
        for e, (rows, part_w) in enumerate(zip(torch.split(token, sizes), torch.split(w[:n], sizes))):
            if not self.fp8:
                part = x[rows]
                outs.append(self._weighted_activation(part @ self.w13[e].t(), part_w) @ self.w2[e].t())
                continue
            hq, hs = (x.q[rows], x.scale[rows]) if isinstance(x, fp8.Fp8Rows) else fp8.quantize_rows(x[rows])
            g1 = fp8.scaled_mm(hq, hs, self.w13[e], self.w13_scale[e], self.dtype)
            aq, a_scale = fp8.quantize_rows(self._weighted_activation_fp32(g1, part_w))
            outs.append(fp8.scaled_mm(aq, a_scale, self.w2[e], self.w2_scale[e], self.dtype))
        pair = torch.arange(order.numel(), device=order.device)
        slot_to_row = torch.empty_like(order)
        slot_to_row[order] = torch.where(pair < n, pair, -1)
        return self._combine(None, torch.cat(outs), 0, token, slot_to_row, None, order.numel() // k, k)

    @staticmethod
    def _weighted_activation(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # down_proj is linear, so the routing weight can scale its (narrower) input instead of its output.
        return (swiglu_up_gate(fused).float() * w[:, None]).to(fused.dtype)

    @staticmethod
    def _weighted_activation_fp32(fused: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The FP8 path quantizes the fp32 activation directly (as the fused kernel does)."""
        return swiglu_up_gate(fused.float()) * w.float()[:, None]

    @staticmethod
    def _combine(out, y, lo, token, slot_to_row, num_pairs, num_tokens, k):
        """Adds the chunk of pair rows lo .. lo + len(y) into out [num_tokens, D] (None: the first
        chunk, which also zeroes the tokens it does not touch). Per token the slots in the chunk
        are summed in slot order in fp32, then added to out: no atomics, the same order on every
        path."""
        if kernels.available(y):
            if out is None:
                return moe_kernels.combine(y, slot_to_row, num_tokens, k)
            return moe_kernels.combine_add(out, y, lo, token, slot_to_row, num_pairs, k)
        acc = torch.zeros(num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        if y.shape[0]:
            per_token = slot_to_row.view(num_tokens, k)
            inside = (per_token >= lo) & (per_token < lo + y.shape[0])
            at = (per_token - lo).clamp(0, y.shape[0] - 1)
            for j in range(k):
                # Rows past the local pairs were never written: select (not multiply) them away.
                acc += torch.where(inside[:, j, None], y[at[:, j]].float(), 0.0)
        return acc.to(y.dtype) if out is None else (out.float() + acc).to(out.dtype)
