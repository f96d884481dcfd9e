"""HunyuanImage-3.0 attention: fused per-KV-head QKV, 2D RoPE, q/k RMSNorm after RoPE, GQA.

TP shards whole KV-head groups (the fused QKV rows of a group are contiguous, so a TP rank's
rows are one contiguous block). The generalized causal mask is never materialised:

  prefix  (text before <timestep>): plain causal attention, K/V kept for every denoising step;
  step tokens (<timestep>, then <guidance> and <timestep_r> where the model has them): causal, each
               attends to the prefix and the step tokens up to itself (one token: no mask);
  image tokens: attend to the prefix, the step tokens and every image token (no mask), split over
               SP ranks with Ulysses.

Writing text (the Instruct models' think and recaption passes) prefills the same way, then runs one
token a step against a TextCache that grows in place (every SP rank holds the whole token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ... import kernels
from ...distributed.parallel_state import Group
from ...kernels import norm as norm_kernels
from ...distributed.sequence_parallel import gather_heads, scatter_heads
from ...layers.linear import ColumnParallelLinear, RowParallelLinear
from ...layers.norm import RMSNorm
from .rotary import apply_rope


@dataclass
class KVCache:
    k: torch.Tensor  # [B, L, KV_local, D]
    v: torch.Tensor
    key_mask: torch.Tensor | None = None  # [B, L], False at padding (prompts of different lengths)


DECODE_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# A text prefix's causal prefill runs once per prompt length: cuDNN's attention spends ~1.9 ms of
# host time a call there (a plan per new shape), 37 ms of a 20-layer prefill whose kernels take
# 15 ms on an H100; flash attention (GQA, causal) costs none (BENCHMARKS §23). Where the GPU is
# the bottleneck torch's choice stays: the denoising steps and an edit's masked prefix (cuDNN's
# kernels there are faster: memory-efficient attention took 53 ms for its 20 layers).
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class TextCache:
    """A layer's K/V while writing text: the prefix's, then one token a step, in buffers sized for
    the whole pass (no copy per token); Attention.decode writes each row's token at its slot."""

    k: torch.Tensor  # [B, capacity, KV_local, D]
    v: torch.Tensor

    @classmethod
    def of(cls, prefix: KVCache, capacity: int) -> "TextCache":
        capacity = -(-capacity // 16) * 16  # the memory-efficient kernel's mask alignment
        B, L, H, D = prefix.k.shape
        k, v = (prefix.k.new_zeros(B, capacity, H, D) for _ in range(2))  # masked, but finite
        k[:, :L], v[:, :L] = prefix.k, prefix.v
        return cls(k, v)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def joined(self, other: "TextCache") -> "TextCache":
        """This cache's rows, then other's, in the larger capacity of the two."""
        capacity = max(self.capacity, other.capacity)

        def grown(t):
            return F.pad(t, (0, 0, 0, 0, 0, capacity - t.shape[1]))
        return TextCache(torch.cat([grown(self.k), grown(other.k)]), torch.cat([grown(self.v), grown(other.v)]))


def sdpa(q, k, v, causal: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, L, Hkv, D] -> [B, S, Hq, D]; Hq a multiple of Hkv (GQA).
    key_mask [B, L] or, per query, [B, S, L]: keys each query may see (None: all)."""
    group = q.shape[2] // k.shape[2]
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        if group > 1:  # the fused kernels that take a mask do not take GQA: expand the KV heads
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, tp: Group,
                 sp: Group, eps: float = 1e-5, dtype=None, device=None, quant_config=None, step_tokens: int = 1):
        """quant_config: the quantization scheme of the projections (None: in dtype). step_tokens:
        the tokens a denoising step writes before the image (config.num_step_tokens)."""
        super().__init__()
        self.step_tokens = step_tokens
        # The head counts were checked against the config (config.py) and the layout
        # (HunyuanImage3Info.check_layout) before any rank started.
        self.tp, self.sp = tp, sp
        self.group_size = num_heads // num_kv_heads  # query heads per KV head
        self.kv_heads = num_kv_heads // tp.size  # on this TP rank
        self.head_dim = head_dim
        self.qkv_proj = ColumnParallelLinear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, tp,
                                             dtype=dtype, device=device, quant_config=quant_config)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, tp, dtype=dtype, device=device,
                                        quant_config=quant_config)
        self.query_layernorm = RMSNorm(head_dim, eps, dtype=dtype, device=device)
        self.key_layernorm = RMSNorm(head_dim, eps, dtype=dtype, device=device)

    def _qkv(self, x, cos, sin):
        B, S, _ = x.shape
        qkv = self.qkv_proj(x).view(B, S, self.kv_heads, self.group_size + 2, self.head_dim)
        if kernels.available(qkv) and norm_kernels.rope_qk_norm_supported(qkv):
            q, k = norm_kernels.rope_qk_norm(qkv, cos, sin, self.query_layernorm.weight, self.key_layernorm.weight,
                                             self.query_layernorm.eps)
            return q, k, qkv[:, :, :, self.group_size + 1]
        q = qkv[:, :, :, : self.group_size].reshape(B, S, self.kv_heads * self.group_size, self.head_dim)
        k, v = qkv[:, :, :, self.group_size], qkv[:, :, :, self.group_size + 1]
        q = self.query_layernorm(apply_rope(q, cos, sin))
        k = self.key_layernorm(apply_rope(k, cos, sin))
        return q, k, v

    def _out(self, o):
        return self.o_proj(o.flatten(2))

    def prefill(self, x, cos, sin, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KVCache]:
        """Causal attention over the text prefix; returns its output and K/V for later steps.
        mask [1 or B, L, L]: the keys each query sees, where the prefix holds runs that attend both
        ways (an edit's input images); None: causal."""
        q, k, v = self._qkv(x, cos, sin)
        if mask is None:
            with sdpa_kernel(PREFILL_BACKENDS):
                out = sdpa(q, k, v, causal=True)
        else:
            out = sdpa(q, k, v, key_mask=mask)
        return self._out(out), KVCache(k, v)

    def decode(self, x, cos, sin, cache: TextCache, slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """x [B, 1, hidden]: each row's next token, written to slot slots[r] (on the device); it sees
        the slots `visible` [B, capacity] marks (its prefix and its written tokens: prompts of
        different lengths write from their own ends, as the reference's right-padded batch does).
        Shapes do not change from step to step: the step can be a CUDA graph.

        The query heads that share a KV head attend as that head's queries ([B, group, KV, D]: no
        GQA expansion; the mask broadcasts over them), by the memory-efficient kernel: cuDNN's
        builds a plan for every new key length, ~2 ms of host time a call on an H100 (BENCHMARKS §19)."""
        q, k, v = self._qkv(x, cos, sin)
        B = x.shape[0]
        q = q.view(B, self.kv_heads, self.group_size, self.head_dim).transpose(1, 2)
        rows = torch.arange(B, device=x.device)
        cache.k[rows, slots], cache.v[rows, slots] = k[:, 0], v[:, 0]
        with sdpa_kernel(DECODE_BACKENDS):
            out = sdpa(q, cache.k, cache.v, key_mask=visible)
        return self._out(out.transpose(1, 2).reshape(B, 1, -1, self.head_dim))

    def forward(self, x, cos, sin, cache: KVCache) -> torch.Tensor:
        """x [B, n + N/SP, hidden]: the n step tokens, then this SP rank's chunk of the image tokens."""
        n = self.step_tokens
        q, k, v = self._qkv(x, cos, sin)
        k_prefix = torch.cat([cache.k, k[:, :n]], dim=1)  # prefix + step tokens
        v_prefix = torch.cat([cache.v, v[:, :n]], dim=1)
        prefix_mask = image_mask = None
        if cache.key_mask is not None:
            prefix_mask = F.pad(cache.key_mask, (0, n), value=True)
        # Causal among the step tokens: token j sees the prefix and step tokens 0..j, one call each
        # (n <= 3), so no mask is needed without padding (a mask would expand the GQA heads of the
        # whole prefix in every layer and step).
        L = k_prefix.shape[1] - n
        step_out = torch.cat([sdpa(q[:, j:j + 1], k_prefix[:, :L + j + 1], v_prefix[:, :L + j + 1],
                                   key_mask=None if prefix_mask is None else prefix_mask[:, :L + j + 1])
                              for j in range(n)], dim=1)

        # Image tokens: the whole image for 1/SP of the heads.
        q_img, k_img, v_img = (scatter_heads(t[:, n:], self.sp) for t in (q, k, v))
        heads = slice(self.sp.rank * k_img.shape[2], (self.sp.rank + 1) * k_img.shape[2])
        if prefix_mask is not None:
            image_mask = F.pad(prefix_mask, (0, k_img.shape[1]), value=True)
        image_out = sdpa(q_img, torch.cat([k_prefix[:, :, heads], k_img], dim=1),
                         torch.cat([v_prefix[:, :, heads], v_img], dim=1), key_mask=image_mask)
        image_out = gather_heads(image_out, self.sp)
        return self._out(torch.cat([step_out, image_out], dim=1))
