"""Where the routed-expert time goes, piece by piece, on one GPU at HunyuanImage-3.0 shapes.

    python benchmarks/expert_pieces.py [--tokens 8192] [--out results/]

Times (CUDA events, mean of --iters after warm-up) GroupedExperts.forward and each of its steps
in isolation, and variants: B operand pre-transposed (contiguous [E, K, N]) against the
transposed view the module uses, the routing weight applied in bf16 against fp32, and the bare
grouped GEMM + SwiGLU on rows already sorted by expert (the ceiling BENCHMARKING.md quotes).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from epdiff.kernels import moe as moe_kernels
from epdiff.layers.activation import swiglu_up_gate
from epdiff.moe.experts import GroupedExperts
from epdiff.quantization.base import grouped_mm as _grouped_mm


def timed(fn, iters):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--inter", type=int, default=3072)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    T, D, E, k, I = a.tokens, a.hidden, a.experts, a.top_k, a.inter
    experts = GroupedExperts(E, D, I, dtype=bf16, device=dev)
    torch.nn.init.normal_(experts.up_gate_proj, std=0.02)
    torch.nn.init.normal_(experts.down_proj, std=0.02)
    x = torch.randn(T, D, device=dev, dtype=bf16)
    stride = E // k  # balanced routing: every expert gets T·k/E pairs
    base = torch.randperm(T, device=dev) % stride
    ids = torch.randperm(E, device=dev)[base[:, None] + stride * torch.arange(k, device=dev)[None]]
    w = torch.rand(T, k, device=dev).softmax(-1)
    P = T * k
    flops = P * 6 * D * I

    # The module's own steps, reproduced one at a time.
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    rows, expert = order // k, flat[order]
    counts = torch.bincount(expert, minlength=E)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = x[rows]
    ws = w.flatten()[order, None]
    g1 = _grouped_mm(h, experts.up_gate_proj.transpose(-2, -1), offs)
    act = (swiglu_up_gate(g1).float() * ws).to(bf16)
    out = _grouped_mm(act, experts.down_proj.transpose(-2, -1), offs)
    w13t, w2t = experts.up_gate_proj.transpose(-2, -1).contiguous(), experts.down_proj.transpose(-2, -1).contiguous()

    slot_to_row = torch.full((P,), -1, dtype=torch.int64, device=dev)
    slot_to_row[order] = torch.arange(P, device=dev)

    def combine():
        per_slot = x.new_zeros(P, D)
        per_slot[order] = out
        return per_slot.view(T, k, D).sum(1)

    res = {
        "module forward (total, eager element-wise)": timed(lambda: experts(x, ids, w), a.iters),
        "module forward (total, inference: Triton element-wise)": timed(inference(lambda: experts(x, ids, w)), a.iters),
        "sort + host sync + counts": timed(lambda: (torch.argsort(torch.where(flat >= 0, flat, E), stable=True),
                                                    int((flat >= 0).sum())), a.iters),
        "gather rows x[rows]": timed(lambda: x[rows], a.iters),
        "grouped GEMM 1 (w13 transposed view)": timed(lambda: _grouped_mm(h, experts.up_gate_proj.transpose(-2, -1), offs), a.iters),
        "grouped GEMM 1 (w13 pre-transposed)": timed(lambda: _grouped_mm(h, w13t, offs), a.iters),
        "SwiGLU + weight, fp32": timed(lambda: (swiglu_up_gate(g1).float() * ws).to(bf16), a.iters),
        "SwiGLU + weight, bf16": timed(lambda: swiglu_up_gate(g1) * ws.to(bf16), a.iters),
        "grouped GEMM 2 (w2 transposed view)": timed(lambda: _grouped_mm(act, experts.down_proj.transpose(-2, -1), offs), a.iters),
        "grouped GEMM 2 (w2 pre-transposed)": timed(lambda: _grouped_mm(act, w2t, offs), a.iters),
        "combine (per-slot scatter + sum over k)": timed(combine, a.iters),
        "combine (index_add fp32)": timed(lambda: torch.zeros(T, D, device=dev).index_add_(0, rows, out.float()), a.iters),
        "SwiGLU + weight, Triton": timed(lambda: moe_kernels.swiglu(g1, ws.flatten()), a.iters),
        "combine, Triton": timed(lambda: moe_kernels.combine(out, slot_to_row, T, k), a.iters),
        "ceiling: GEMM1 + SwiGLU + GEMM2 on sorted rows": timed(
            lambda: _grouped_mm(swiglu_up_gate(_grouped_mm(h, w13t, offs)), w2t, offs), a.iters),
    }
    print(f"{T} tokens × top-{k}, {E} experts, {D}→{I}: {flops / 1e12:.2f} TFLOP in the expert GEMMs")
    for name, ms in res.items():
        extra = f"  ({flops / ms / 1e9:.0f} TFLOP/s)" if name.startswith(("module", "ceiling")) else ""
        print(f"{ms:8.3f} ms  {name}{extra}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "expert_pieces.json"), "w") as f:
            json.dump(dict(args=vars(a), ms=res, expert_tflop=flops / 1e12), f, indent=1)


if __name__ == "__main__":
    main()
