"""Fused element-wise steps of the expert path.

Measured on an H200 at HunyuanImage-3.0 shapes (65,536 routed rows, benchmarks/expert_pieces.py):
SwiGLU + routing weight in eager PyTorch took 2.7 ms and the per-slot combine 1.8 ms for
~1.2 GB and ~0.6 GB of necessary traffic. Each kernel here reads its inputs once and writes its
output once. Elsewhere (CPU, no Triton) the eager versions in experts.py run. `swiglu` without a
weight also serves the dense and shared-expert MLPs.

The FP8 expert path quantizes its two GEMM inputs in the passes that already touch them:
`gather_quant_rows` gathers a token row and writes it as float8 with its per-row scale, and
`swiglu_quant` writes the activation the same way (quantization/fp8.py has the arithmetic and
the eager reference). Both keep a whole row in registers, which the row's scale needs.

Row counts that only the device knows (how many (token, expert) pairs are local) arrive as a
1-element device tensor. The row kernels are persistent (a fixed grid striding over rows up to
that count), so a launch over a mostly empty buffer costs one wave, not one program per row:
the expert path runs its buffer in chunks, and the last chunks are often empty.
"""

from __future__ import annotations

import torch

from . import sm_count, tl, triton

# The row-quantized format the FP8 kernels write: float8_e4m3fn codes with one fp32 scale per row,
# amax / FP8_MAX (quantization/fp8.py computes the same eagerly).
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# An all-zero row still gets a positive scale (its codes are 0, so the value does not matter).
MIN_AMAX = 1e-12
BLOCK = 1024
PROGRAMS_PER_SM = 8

if triton is not None:
    # Globals a Triton kernel reads must be compile-time constants.
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _MIN_AMAX = tl.constexpr(MIN_AMAX)

    @triton.jit
    def _swiglu_kernel(fused_ptr, weight_ptr, out_ptr, count_ptr, width, fused_stride, out_stride,
                       HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        count = tl.load(count_ptr)
        for i in range(tl.program_id(0), count, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + row).to(tl.float32)
            for start in range(0, width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < width
                up = tl.load(fused_ptr + row * fused_stride + cols, mask=mask, other=0.0).to(tl.float32)
                gate = tl.load(fused_ptr + row * fused_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
                y = up * gate * tl.sigmoid(gate) * w
                tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gather_rows_kernel(x_ptr, rows_ptr, out_ptr, count_ptr, width, x_stride, out_stride,
                            BLOCK: tl.constexpr):
        count = tl.load(count_ptr)
        for i in range(tl.program_id(0), count, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)
            src = tl.load(rows_ptr + row).to(tl.int64)
            for start in range(0, width, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < width
                tl.store(out_ptr + row * out_stride + cols, tl.load(x_ptr + src * x_stride + cols, mask=mask),
                         mask=mask)

    @triton.jit
    def _quantize_row(x, q_row_ptr, scale_ptr, row, mask):
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), _MIN_AMAX)
        scale = amax / _FP8_MAX
        # A multiply by the reciprocal, not a division per element: codes may differ from the
        # eager x / scale in a last-ulp tie, which moves a value to the neighbouring code.
        q = tl.minimum(tl.maximum(x * (_FP8_MAX / amax), -_FP8_MAX), _FP8_MAX)
        tl.store(q_row_ptr, q.to(q_row_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _gather_quant_rows_kernel(x_ptr, rows_ptr, q_ptr, scale_ptr, count_ptr, width, x_stride, q_stride,
                                  HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        count = tl.load(count_ptr)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        for i in range(tl.program_id(0), count, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)
            src = row
            if HAS_ROWS:
                src = tl.load(rows_ptr + row).to(tl.int64)
            x = tl.load(x_ptr + src * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
            _quantize_row(x, q_ptr + row * q_stride + cols, scale_ptr, row, mask)

    @triton.jit
    def _swiglu_quant_kernel(fused_ptr, weight_ptr, q_ptr, scale_ptr, count_ptr, width, fused_stride, q_stride,
                             BLOCK: tl.constexpr):
        count = tl.load(count_ptr)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        for i in range(tl.program_id(0), count, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)
            up = tl.load(fused_ptr + row * fused_stride + cols, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(fused_ptr + row * fused_stride + width + cols, mask=mask, other=0.0).to(tl.float32)
            y = up * gate * tl.sigmoid(gate) * tl.load(weight_ptr + row).to(tl.float32)
            _quantize_row(y, q_ptr + row * q_stride + cols, scale_ptr, row, mask)

    @triton.jit
    def _combine_kernel(rows_ptr, slot_ptr, out_ptr, width, rows_stride, out_stride, row_hi, K: tl.constexpr,
                        BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            src = tl.load(slot_ptr + token * K + j).to(tl.int64)
            inside = (src >= 0) & (src < row_hi)
            acc += tl.load(rows_ptr + src * rows_stride + cols, mask=mask & inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_add_kernel(rows_ptr, token_ptr, slot_ptr, out_ptr, count_ptr, width, rows_stride, out_stride,
                            row_lo, row_hi, K: tl.constexpr, BLOCK: tl.constexpr):
        # Driven by the pair rows of one chunk, so an empty chunk costs one wave. Of a token's
        # slots inside the chunk, the first one's program sums them all (in slot order, fp32) and
        # adds the sum to the token's output: deterministic, no atomics.
        count = tl.minimum(tl.load(count_ptr), row_hi)
        for i in range(row_lo + tl.program_id(0), count, tl.num_programs(0)):
            row = tl.cast(i, tl.int64)
            token = tl.load(token_ptr + row).to(tl.int64)
            first = row
            for j in tl.static_range(K):
                src = tl.load(slot_ptr + token * K + j).to(tl.int64)
                first = tl.where((src >= row_lo) & (src < count) & (src < first), src, first)
            if first == row:
                for start in range(0, width, BLOCK):
                    cols = start + tl.arange(0, BLOCK)
                    mask = cols < width
                    acc = tl.zeros([BLOCK], dtype=tl.float32)
                    for j in tl.static_range(K):
                        src = tl.load(slot_ptr + token * K + j).to(tl.int64)
                        inside = (src >= row_lo) & (src < count)
                        acc += tl.load(rows_ptr + (src - row_lo) * rows_stride + cols, mask=mask & inside,
                                       other=0.0).to(tl.float32)
                    dst = out_ptr + token * out_stride + cols
                    acc += tl.load(dst, mask=mask, other=0.0).to(tl.float32)
                    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_sorted_kernel(rows_ptr, order_ptr, offsets_ptr, add_ptr, out_ptr, width, rows_stride, add_stride,
                               out_stride, HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(tl.load(offsets_ptr + token), tl.load(offsets_ptr + token + 1)):
            src = tl.load(order_ptr + j).to(tl.int64)
            acc += tl.load(rows_ptr + src * rows_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_ADD:
            acc += tl.load(add_ptr + token * add_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token * out_stride + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _programs(device: torch.device) -> int:
    return sm_count(device) * PROGRAMS_PER_SM


def _grid(rows: int, device: torch.device) -> tuple[int]:
    """Persistent programs striding over the rows. The count is a launch size, not a constexpr:
    a kernel compiled per row count would recompile for every new prompt length."""
    return (min(rows, _programs(device)),)


def _count(count: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    return torch.full((1,), rows, dtype=torch.int32, device=device) if count is None else count


def _row_warps(block: int) -> int:
    return min(16, max(1, block // 512))


def _row_block(width: int) -> int:
    """Whole rows per loop step up to 8192 elements: 16 elements per thread at 8 warps keeps
    enough bytes in flight per SM for the memory system (a 1024-wide block left half idle)."""
    return min(triton.next_power_of_2(width), 8192)


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
        grid = _grid(P, fused.device)
        block = _row_block(width)
        _swiglu_kernel[grid](fused, fused if weight is None else weight.contiguous(), out,
                                _count(count, P, fused.device), width, fused.stride(0), out.stride(0),
                                HAS_WEIGHT=weight is not None, BLOCK=block,
                                num_warps=_row_warps(block))
    return out


def gather_rows(x: torch.Tensor, rows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """out[i] = x[rows[i]] for i < count (a 1-element device tensor); rows past it unwritten.
    Any dtype (float8 rows too)."""
    P, D = rows.shape[0], x.shape[1]
    out = x.new_empty(P, D)
    if P:
        x = x.contiguous()
        grid = _grid(P, x.device)
        block = _row_block(D)
        _gather_rows_kernel[grid](x, rows.contiguous(), out, count, D, x.stride(0), out.stride(0),
                                     BLOCK=block, num_warps=_row_warps(block))
    return out


def gather_quant_rows(x: torch.Tensor, rows: torch.Tensor, count: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """q[i], scale[i] = quantize_rows(x[rows[i]]) for i < count (a 1-element device tensor), in
    one pass; rows past count are left unwritten. q [P, D] float8_e4m3fn, scale [P] fp32."""
    return _quantize(x, rows.contiguous(), count, rows.shape[0])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantization/fp8.quantize_rows of x [M, D] in one pass: (q [M, D] float8_e4m3fn, scale [M])."""
    return _quantize(x, None, _count(None, x.shape[0], x.device), x.shape[0])


def _quantize(x: torch.Tensor, rows: torch.Tensor | None, count: torch.Tensor, P: int):
    """Row i of the output quantizes x[rows[i]] (x[i] when rows is None), for i < count."""
    D = x.shape[1]
    q = torch.empty(P, D, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(P, dtype=torch.float32, device=x.device)
    if P:
        block = triton.next_power_of_2(D)
        x = x.contiguous()
        _gather_quant_rows_kernel[_grid(P, x.device)](x, x if rows is None else rows, q, scale, count, D, x.stride(0),
                                                      q.stride(0), HAS_ROWS=rows is not None, BLOCK=block,
                                                      num_warps=_row_warps(block))
    return q, scale


def swiglu_quant(fused: torch.Tensor, weight: torch.Tensor, count: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(up·silu(gate) · weight) of fused [P, 2I] ([up; gate]) for the first count
    rows, fp32 math: (q [P, I] float8_e4m3fn, scale [P] fp32); later rows unwritten."""
    P, two_i = fused.shape
    width = two_i // 2
    q = torch.empty(P, width, dtype=FP8_DTYPE, device=fused.device)
    scale = torch.empty(P, dtype=torch.float32, device=fused.device)
    if P:
        block = triton.next_power_of_2(width)
        fused = fused.contiguous()
        grid = _grid(P, fused.device)
        _swiglu_quant_kernel[grid](fused, weight.contiguous(), q, scale, count, width, fused.stride(0),
                                      q.stride(0), BLOCK=block, num_warps=_row_warps(block))
    return q, scale


def combine(rows: torch.Tensor, slot_to_row: torch.Tensor, num_tokens: int, k: int) -> torch.Tensor:
    """rows [C, D]: the outputs of pair rows 0 .. C; slot_to_row [num_tokens·k]: the pair row
    holding (token, slot)'s output, or -1. Returns [num_tokens, D]: per token, the sum of its
    slots whose row is below C (fp32 accumulation); later rows are combine_add's."""
    D = rows.shape[1]
    out = rows.new_empty(num_tokens, D)
    if rows.shape[0] == 0:
        return out.zero_()
    if num_tokens:
        rows = rows.contiguous()
        _combine_kernel[(num_tokens, triton.cdiv(D, BLOCK))](rows, slot_to_row, out, D, rows.stride(0),
                                                             out.stride(0), rows.shape[0], K=k, BLOCK=BLOCK)
    return out


def combine_add(out: torch.Tensor, rows: torch.Tensor, row_lo: int, pair_token: torch.Tensor,
                slot_to_row: torch.Tensor, count: torch.Tensor, k: int) -> torch.Tensor:
    """A later chunk: rows [C, D] hold pair rows row_lo .. row_lo + C (those below count, a
    1-element device tensor, are real); pair_token[r] is pair row r's token. Adds each token's
    slots in that range (summed in fp32) to out [num_tokens, D] in place."""
    C, D = rows.shape
    if C and out.shape[0]:
        rows = rows.contiguous()
        grid = _grid(C, rows.device)
        _combine_add_kernel[grid](rows, pair_token, slot_to_row, out, count, D, rows.stride(0), out.stride(0),
                                     row_lo, row_lo + C, K=k, BLOCK=BLOCK)
    return out


def combine_by_token(rows: torch.Tensor, row_token: torch.Tensor, num_tokens: int,
                     add: torch.Tensor | None = None) -> torch.Tensor:
    """rows [N, D], row r belonging to token row_token[r] (a token may have any number of rows, none
    included). Returns [num_tokens, D]: per token the sum of its rows in row order, plus its row
    of `add` [num_tokens, D] if given (a shared expert's output), accumulated in fp32 without
    atomics: for routings whose tokens have a varying number of rows (expert choice), where
    `combine`'s fixed slots would mostly be empty. No host sync."""
    D = rows.shape[1]
    out = rows.new_empty(num_tokens, D)
    if num_tokens:
        token, order = torch.sort(row_token.to(torch.int32), stable=True)  # 32-bit keys: half the radix passes
        offsets = torch.searchsorted(token, torch.arange(num_tokens + 1, device=rows.device, dtype=token.dtype))
        rows = rows.contiguous()
        extra = out if add is None else add.reshape(num_tokens, D)
        _combine_sorted_kernel[(num_tokens, triton.cdiv(D, BLOCK))](
            rows, order, offsets, extra, out, D, rows.stride(0), extra.stride(0), out.stride(0),
            HAS_ADD=add is not None, BLOCK=BLOCK)
    return out
