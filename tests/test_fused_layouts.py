"""The two fused layouts a loader most easily gets wrong, checked against unfused math:
QKV grouped per KV head ([q heads of group g; k_g; v_g] for each g) and SwiGLU [up; gate]."""

import torch
import torch.nn.functional as F

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.hunyuan_image3.attention import Attention
from epdiff.layers.mlp import SwiGLUMLP
from epdiff.models.hunyuan_image3.rotary import apply_rope, rope_2d
from epdiff.moe.experts import GroupedExperts

D, H, KV, HD = 64, 8, 2, 8  # 4 query heads per KV head


def rms(x, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def test_fused_qkv_grouped_per_kv_head():
    g = torch.Generator().manual_seed(0)
    wq = torch.randn(H, HD, D, generator=g) / 8  # per query head
    wk = torch.randn(KV, HD, D, generator=g) / 8
    wv = torch.randn(KV, HD, D, generator=g) / 8
    group = H // KV
    fused = torch.cat([torch.cat([wq[j * group:(j + 1) * group], wk[j:j + 1], wv[j:j + 1]]) for j in range(KV)])
    fused = fused.reshape(-1, D)  # the release layout: [kv, group + 2, head_dim, hidden]

    single = ParallelState.single()
    attn = Attention(D, H, KV, HD, single.tp, single.sp)
    attn.qkv_proj.load_weight(fused)
    wo = torch.randn(D, H * HD, generator=g) / 8
    attn.o_proj.load_weight(wo)

    x = torch.randn(1, 6, D, generator=g)
    positions = torch.stack([torch.arange(6), torch.arange(6)], -1)
    cos, sin = rope_2d(positions, HD)
    out, _ = attn.prefill(x, cos[None], sin[None])

    q = torch.einsum("bsd,hkd->bshk", x, wq)
    k = torch.einsum("bsd,hkd->bshk", x, wk)
    v = torch.einsum("bsd,hkd->bshk", x, wv)
    q, k = rms(apply_rope(q, cos[None], sin[None])), rms(apply_rope(k, cos[None], sin[None]))
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # query head i uses KV head i // 4
    scores = torch.einsum("bqhk,bshk->bhqs", q, k) / HD ** 0.5
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expect = torch.einsum("bhqs,bshk->bqhk", scores.softmax(-1), v).reshape(1, 6, H * HD) @ wo.t()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-6)


def test_fused_gate_and_up_is_up_then_gate():
    g = torch.Generator().manual_seed(1)
    up, gate, down = torch.randn(32, D, generator=g), torch.randn(32, D, generator=g), torch.randn(D, 32, generator=g)
    x = torch.randn(5, D, generator=g)
    expect = (x @ up.t() * F.silu(x @ gate.t())) @ down.t()
    fused = torch.cat([up, gate])  # release: rows [0, I) up, [I, 2I) gate

    single = ParallelState.single()
    mlp = SwiGLUMLP(D, 32, single.tp)
    mlp.up_gate_proj.load_weight(fused)
    mlp.down_proj.load_weight(down)
    torch.testing.assert_close(mlp(x), expect, rtol=1e-5, atol=1e-5)

    experts = GroupedExperts(1, D, 32, kernel="loop")
    with torch.no_grad():
        experts.up_gate_proj[0].copy_(fused)
        experts.down_proj[0].copy_(down)
    y, _ = experts(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1))
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
