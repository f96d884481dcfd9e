"""Fused RMSNorm (after an optional residual add), RoPE + per-head RMSNorm of q and k (and, for
Nucleus-Image, per-head RMSNorm + RoPE on adjacent pairs), LayerNorm modulated per image (after
an optional gated residual add), and the VAE's GroupNorm (+ swish).

Profiled on an H200 (benchmarks/profile_step.py, release width, 8 layers, 1024²): eager fp32
upcasts, rotate-half temporaries and norm statistics took ~27 ms of a 133 ms step. Each kernel
here rounds where the eager code rounds (to the activation dtype after the residual add, after
RoPE and after normalising), so it computes the eager result up to summation order.
"""

from __future__ import annotations

import torch

from . import sm_count, tl, triton

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, width, eps, HAS_RESIDUAL: tl.constexpr,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * width + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * width + cols, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)
        normed = (xf * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_qk_norm_kernel(qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, seq_len, kv_heads, group,
                             token_stride, cos_batch_stride, eps, HALF: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one (token, KV head, slot) row; slots 0..group-1 = q, group = k
        slot = pid % (group + 1)
        head = (pid // (group + 1)) % kv_heads
        token = pid // ((group + 1) * kv_heads)
        b, s = token // seq_len, token % seq_len
        cols = tl.arange(0, HALF)
        src = qkv_ptr + token * token_stride + (head * (group + 2) + slot) * (2 * HALF)
        x1 = tl.load(src + cols).to(tl.float32)
        x2 = tl.load(src + HALF + cols).to(tl.float32)
        angle = b * cos_batch_stride + s * (2 * HALF)
        c1, c2 = tl.load(cos_ptr + angle + cols), tl.load(cos_ptr + angle + HALF + cols)
        s1, s2 = tl.load(sin_ptr + angle + cols), tl.load(sin_ptr + angle + HALF + cols)
        dtype = q_ptr.dtype.element_ty
        r1 = (x1 * c1 - x2 * s1).to(dtype).to(tl.float32)  # rotate-half RoPE, rounded like the eager code
        r2 = (x2 * c2 + x1 * s2).to(dtype).to(tl.float32)
        inv = tl.rsqrt((tl.sum(r1 * r1, axis=0) + tl.sum(r2 * r2, axis=0)) / (2 * HALF) + eps)
        n1 = (r1 * inv).to(dtype).to(tl.float32)
        n2 = (r2 * inv).to(dtype).to(tl.float32)
        if slot < group:
            dst = q_ptr + ((token * kv_heads + head) * group + slot) * (2 * HALF)
            w1, w2 = tl.load(qw_ptr + cols).to(tl.float32), tl.load(qw_ptr + HALF + cols).to(tl.float32)
        else:
            dst = k_ptr + (token * kv_heads + head) * (2 * HALF)
            w1, w2 = tl.load(kw_ptr + cols).to(tl.float32), tl.load(kw_ptr + HALF + cols).to(tl.float32)
        tl.store(dst + cols, (w1 * n1).to(dtype))
        tl.store(dst + HALF + cols, (w2 * n2).to(dtype))


    @triton.jit
    def _rms_norm_rope_pairs_kernel(x_ptr, w_ptr, rot_ptr, out_ptr, seq_len, heads, eps, HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (token, head) row of D = 2·HALF
        s = (row // heads) % seq_len
        pairs = tl.arange(0, HALF)
        even = tl.load(x_ptr + row * (2 * HALF) + 2 * pairs).to(tl.float32)
        odd = tl.load(x_ptr + row * (2 * HALF) + 2 * pairs + 1).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        inv = tl.rsqrt((tl.sum(even * even, axis=0) + tl.sum(odd * odd, axis=0)) / (2 * HALF) + eps)
        w_even = tl.load(w_ptr + 2 * pairs).to(tl.float32)
        w_odd = tl.load(w_ptr + 2 * pairs + 1).to(tl.float32)
        n_even = (w_even * (even * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)  # RMSNorm's rounding
        n_odd = (w_odd * (odd * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        c = tl.load(rot_ptr + s * (2 * HALF) + 2 * pairs)  # (cos, sin) of each pair's angle, fp32
        sn = tl.load(rot_ptr + s * (2 * HALF) + 2 * pairs + 1)
        tl.store(out_ptr + row * (2 * HALF) + 2 * pairs, (n_even * c - n_odd * sn).to(dtype))
        tl.store(out_ptr + row * (2 * HALF) + 2 * pairs + 1, (n_even * sn + n_odd * c).to(dtype))

    @triton.jit
    def _modulated_layer_norm_kernel(x_ptr, update_ptr, gate_ptr, scale_ptr, sum_ptr, normed_ptr, out_ptr, seq_len,
                                     width, eps, GATED: tl.constexpr, WRITE_NORMED: tl.constexpr,
                                     BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token
        image = row // seq_len
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        if GATED:  # x + gate·update, rounded as the eager product and sum are
            update = tl.load(update_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + image * width + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + (gate * update).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            tl.store(sum_ptr + row * width + cols, x.to(dtype), mask=mask)
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(mask, x - mean, 0.0)
        normed = (centred * tl.rsqrt(tl.sum(centred * centred, axis=0) / width + eps)).to(dtype)
        if WRITE_NORMED:
            tl.store(normed_ptr + row * width + cols, normed, mask=mask)
        scale = tl.load(scale_ptr + image * width + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * width + cols, (normed.to(tl.float32) * scale).to(dtype), mask=mask)


if triton is not None:

    @triton.jit
    def _group_sum_kernel(x_ptr, mean_ptr, part_ptr, size, chunk, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, part): the sum of row's elements part·chunk .. +chunk (centred on the
        row's mean and squared, when CENTERED) into part_ptr[row, part]."""
        row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        start = part * chunk
        center = tl.load(mean_ptr + row) if CENTERED else 0.0
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for offset in range(0, chunk, BLOCK):  # chunk: a multiple of BLOCK; the last part's tail masked
            cols = start + offset + tl.arange(0, BLOCK)
            mask = cols < size
            v = tl.load(x_ptr + row * size + cols, mask=mask, other=0.0).to(tl.float32)
            if CENTERED:
                v = tl.where(mask, v - center, 0.0)
                v = v * v
            acc += v
        tl.store(part_ptr + row * tl.num_programs(1) + part, tl.sum(acc, axis=0))

    @triton.jit
    def _group_norm_kernel(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, out_ptr, size, chunk, spatial, groups,
                           group_channels, SWISH: tl.constexpr, BLOCK: tl.constexpr):
        row, part = tl.program_id(0).to(tl.int64), tl.program_id(1)
        start = part * chunk
        mean, rstd = tl.load(mean_ptr + row), tl.load(rstd_ptr + row)
        for offset in range(0, chunk, BLOCK):
            cols = start + offset + tl.arange(0, BLOCK)
            mask = cols < size
            x = tl.load(x_ptr + row * size + cols, mask=mask, other=0.0).to(tl.float32)
            channel = (row % groups) * group_channels + cols // spatial
            w = tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd * w + b
            if SWISH:
                y = y * tl.sigmoid(y)
            tl.store(out_ptr + row * size + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               swish: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """GroupNorm of x [B, C, ...] (statistics in fp32, two passes: the mean, then the centred
    squares), its affine weight and bias, then x·sigmoid(x) where swish; out_dtype (default x's).
    Each (image, group) row is split over enough programs to fill the GPU: torch's own kernel runs
    one program a row, 32 rows for one image (BENCHMARKS §22)."""
    B, C = x.shape[:2]
    x = x.contiguous()
    size = x.numel() // (B * groups)  # elements of one (image, group) row: C/groups channels
    spatial = size // (C // groups)
    out = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    rows = B * groups
    if not x.numel():
        return out
    block = 2048
    parts = max(1, min(triton.cdiv(size, block), triton.cdiv(8 * sm_count(x.device), rows)))
    chunk = triton.cdiv(triton.cdiv(size, parts), block) * block
    parts = triton.cdiv(size, chunk)
    partial = torch.empty(rows, parts, dtype=torch.float32, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    _group_sum_kernel[(rows, parts)](x, mean, partial, size, chunk, CENTERED=False, BLOCK=block, num_warps=8)
    torch.div(partial.sum(1), size, out=mean)
    _group_sum_kernel[(rows, parts)](x, mean, partial, size, chunk, CENTERED=True, BLOCK=block, num_warps=8)
    rstd = torch.rsqrt(partial.sum(1) / size + eps)
    _group_norm_kernel[(rows, parts)](x, mean, rstd, weight, bias, out, size, chunk, spatial, groups, C // groups,
                                      SWISH=swish, BLOCK=block, num_warps=8)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight · RMSNorm(x) over the last dim; with a residual, (weight · RMSNorm(x + residual),
    x + residual)."""
    width = x.shape[-1]
    flat = x.reshape(-1, width).contiguous()
    out = torch.empty_like(flat)
    total = torch.empty_like(flat) if residual is not None else out
    res = residual.reshape(-1, width).contiguous() if residual is not None else flat
    block = triton.next_power_of_2(width)
    if flat.shape[0]:
        _rms_norm_kernel[(flat.shape[0],)](flat, res, weight, out, total, width, eps,
                                           HAS_RESIDUAL=residual is not None, BLOCK=block,
                                           num_warps=min(16, max(1, block // 256)))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), total.view(x.shape)


def rope_qk_norm_supported(qkv: torch.Tensor) -> bool:
    half = qkv.shape[-1] // 2
    return qkv.stride(-1) == 1 and qkv.stride(-2) == qkv.shape[-1] and half >= 16 and half & (half - 1) == 0


def rope_qk_norm(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, S, KV, group + 2, D] (per KV head: group query heads, k, v); cos/sin [1 or B, S, D]
    fp32. Returns q [B, S, KV·group, D] and k [B, S, KV, D]: RoPE, then RMSNorm with the weight."""
    B, S, kv_heads, slots, D = qkv.shape
    group = slots - 2
    q = qkv.new_empty(B, S, kv_heads * group, D)
    k = qkv.new_empty(B, S, kv_heads, D)
    cos, sin = cos.contiguous(), sin.contiguous()
    if B * S:
        _rope_qk_norm_kernel[(B * S * kv_heads * (group + 1),)](
            qkv, cos, sin, q_weight, k_weight, q, k, S, kv_heads, group, qkv.stride(1),
            cos.stride(0) if cos.shape[0] > 1 else 0, eps, HALF=D // 2, num_warps=1)
    return q, k


def rms_norm_rope_pairs(x: torch.Tensor, weight: torch.Tensor, rotations: torch.Tensor, eps: float) -> torch.Tensor:
    """x [B, S, H, D] -> weight · RMSNorm(x) per head, then each adjacent pair (x[2i], x[2i+1])
    rotated by rotations [S, D/2, 2] (cos, sin; fp32): Nucleus-Image's q/k norm and RoPE."""
    B, S, H, D = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel():
        _rms_norm_rope_pairs_kernel[(B * S * H,)](x, weight, rotations.contiguous(), out, S, H, eps, HALF=D // 2,
                                                  num_warps=1)
    return out


def rms_norm_rope_pairs_supported(x: torch.Tensor) -> bool:
    half = x.shape[-1] // 2
    return half >= 16 and half & (half - 1) == 0


def modulated_layer_norm(x: torch.Tensor, scale: torch.Tensor, eps: float, update: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None, with_normed: bool = False):
    """LayerNorm(x) (no affine) · scale, x [B, S, D], scale [B, D] (one row per image). With update
    and gate ([B, D]), x is first replaced by x + gate · update. Returns (the modulated norm, the
    new x or None, the unmodulated norm or None)."""
    B, S, D = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    gated = update is not None
    total = torch.empty_like(x) if gated else None
    normed = torch.empty_like(x) if with_normed else None
    block = triton.next_power_of_2(D)
    if x.numel():
        _modulated_layer_norm_kernel[(B * S,)](
            x, update.contiguous() if gated else x, gate.contiguous() if gated else scale, scale.contiguous(),
            total if gated else out, normed if with_normed else out, out, S, D, eps, GATED=gated,
            WRITE_NORMED=with_normed, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out, total, normed
