"""Fused element-wise steps of the expert path.

Measured on an H200 at HunyuanImage-3.0 shapes (65,536 routed rows, benchmarks/expert_pieces.py):
SwiGLU + routing weight in eager PyTorch took 2.7 ms and the per-slot combine 1.8 ms for
~1.2 GB and ~0.6 GB of necessary traffic. Each kernel here reads its inputs once and writes its
output once. Elsewhere (CPU, no Triton) the eager versions in experts.py run. `swiglu` without a
weight also serves the dense and shared-expert MLPs.
"""

from __future__ import annotations

import torch

from . import tl, triton

BLOCK = 1024

if triton is not None:

    @triton.jit
    def _swiglu_kernel(fused_ptr, weight_ptr, out_ptr, count_ptr, width, fused_stride, out_stride,
                       HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (cols < width) & (row < tl.load(count_ptr))
        up = tl.load(fused_ptr + row * fused_stride + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(fused_ptr + row * fused_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
        y = up * gate * tl.sigmoid(gate)
        if HAS_WEIGHT:
            y = y * tl.load(weight_ptr + row).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_rows_kernel(x_ptr, rows_ptr, out_ptr, count_ptr, width, x_stride, out_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = row < tl.load(count_ptr)
        mask = (cols < width) & live
        src = tl.load(rows_ptr + row, mask=live, other=0).to(tl.int64)
        tl.store(out_ptr + row * out_stride + cols, tl.load(x_ptr + src * x_stride + cols, mask=mask), mask=mask)

    @triton.jit
    def _combine_kernel(rows_ptr, slot_ptr, out_ptr, width, rows_stride, out_stride, K: tl.constexpr,
                        BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            src = tl.load(slot_ptr + token * K + j).to(tl.int64)
            v = tl.load(rows_ptr + src * rows_stride + cols, mask=mask & (src >= 0), other=0.0)
            acc += v.to(tl.float32)
        tl.store(out_ptr + token * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _count(count: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    return torch.full((1,), rows, dtype=torch.int32, device=device) if count is None else count


def swiglu(fused: torch.Tensor, weight: torch.Tensor | None = None, count: torch.Tensor | None = None
           ) -> torch.Tensor:
    """fused [P, 2I] laid out [up; gate] -> up·silu(gate) [P, I], times weight [P] if given, fp32
    math. count (a 1-element device tensor): only the first count rows are computed, the rest
    of the output is left unwritten."""
    P, two_i = fused.shape
    width = two_i // 2
    out = fused.new_empty(P, width)
    if P:
        fused = fused.contiguous()
        _swiglu_kernel[(P, triton.cdiv(width, BLOCK))](fused, fused if weight is None else weight.contiguous(), out,
                                                        _count(count, P, fused.device), width, fused.stride(0),
                                                        out.stride(0), HAS_WEIGHT=weight is not None, BLOCK=BLOCK)
    return out


def gather_rows(x: torch.Tensor, rows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """out[i] = x[rows[i]] for i < count (a 1-element device tensor); rows past it unwritten."""
    P, D = rows.shape[0], x.shape[1]
    out = x.new_empty(P, D)
    if P:
        x = x.contiguous()
        _gather_rows_kernel[(P, triton.cdiv(D, BLOCK))](x, rows.contiguous(), out, count, D, x.stride(0),
                                                         out.stride(0), BLOCK=BLOCK)
    return out


def combine(rows: torch.Tensor, slot_to_row: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """rows [P, D]; slot_to_row [num_tokens·k]: the row holding (token, slot)'s output, or -1.
    Returns [num_tokens, D]: the sum of each token's k slots (fp32 accumulation)."""
    D = rows.shape[1]
    if rows.shape[0] == 0:
        return rows.new_zeros(num_tokens, D)
    out = rows.new_empty(num_tokens, D)
    if num_tokens:
        rows = rows.contiguous()
        _combine_kernel[(num_tokens, triton.cdiv(D, BLOCK))](rows, slot_to_row, out, D, rows.stride(0),
                                                             out.stride(0), K=k, BLOCK=BLOCK)
    return out
