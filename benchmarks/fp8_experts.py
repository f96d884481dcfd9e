"""FP8 against bf16 on one GPU, side by side in one run, at HunyuanImage-3.0 shapes.

    python benchmarks/fp8_experts.py --out results/

1. Ceilings: dense 8192³ bf16 (`torch.matmul`) and FP8 (row-wise `torch._scaled_mm`).
2. The routed-expert path (GroupedExperts.forward: sort, gather (+ quantize), grouped GEMM,
   SwiGLU (+ quantize), grouped GEMM, combine) in bf16 and FP8, for 4,097 / 8,194 / 16,388 tokens
   × top-8 over 64 experts, balanced routing and a skewed one (busiest expert ÷ mean printed),
   with the pieces: each grouped GEMM's TFLOP/s, the fused quantize kernels and eager quantizing.
3. Dense projections (QKV, O, shared expert) in bf16 against FP8 (row-wise activation quantize +
   `torch._scaled_mm`) at 8,194 tokens: does FP8 pay there?
4. FP8 dispatch on one GPU: only the pack/unpack cost can be measured here (quantizing a rank's
   own rows before the all-gather, gathering FP8 rows after it) against gathering + quantizing
   bf16 rows, and the bytes each puts on the wire.
5. Expert buffers with EP, simulated on one GPU: a rank holding 64/EP experts gets EP × 4,097
   gathered rows (balanced routing); transient peak memory and time of the expert forward with
   the chunked buffers against one buffer for every (token, slot) pair (the sizing before).
6. `--sections kernels`: every kernel of one bf16 and one FP8 expert forward (torch.profiler).

Times: CUDA events, mean of --iters after 3 warm-ups. TFLOP/s count 2·M·N·K per GEMM.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from epdiff.kernels import moe as moe_kernels
from epdiff.moe import experts as experts_module
from epdiff.moe.dispatch import Dispatcher
from epdiff.moe.experts import GroupedExperts
from epdiff.quantization import experts_method, fp8, get_quantization_config
from epdiff.quantization.base import grouped_mm as _grouped_mm
from epdiff.quantization.fp8_method import quantize_tokens
from moe_layer import cuda_time  # same folder: one timer for the benchmarks

FP8 = get_quantization_config("fp8")


def timed(fn, iters: int) -> float:
    """Mean ms of fn() by CUDA events (moe_layer's timer)."""
    return cuda_time(fn, iters)[0]


def routing(tokens: int, experts: int, top_k: int, skewed: bool, device, seed: int = 0):
    """Balanced: every expert gets tokens·k/E pairs. Skewed: expert popularity log-normal (as
    dummy weights route: a few experts take several times the mean)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if skewed:
        popularity = torch.exp(1.2 * torch.randn(experts, generator=g))
        ids = torch.multinomial(popularity.expand(tokens, -1), top_k, replacement=False, generator=g)
    else:
        stride = experts // top_k
        base = torch.randperm(tokens, generator=g) % stride
        ids = torch.randperm(experts, generator=g)[base[:, None] + stride * torch.arange(top_k)[None]]
    w = (torch.rand(tokens, top_k, generator=g) + 0.5)
    load = torch.bincount(ids.flatten(), minlength=experts).float()
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device), float(load.max() / load.mean())


def make_experts(E, D, I, quant, device, num_experts=None):
    experts = GroupedExperts(E, D, I, torch.bfloat16, device, num_experts=num_experts, quant_config=quant)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for kind, shape in (("up_gate_proj", (E, 2 * I, D)), ("down_proj", (E, D, I))):
            value = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) * 0.02
            for e in range(E):
                experts.load_expert(e, kind, value[e])
    return experts


def ceilings(device, iters):
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    bf16 = 2 * n ** 3 / timed(lambda: a @ b, iters) / 1e9
    aq, sa = fp8.quantize_rows(a)
    bq, sb = fp8.quantize_weight(b)
    fp8_rate = 2 * n ** 3 / timed(lambda: fp8.scaled_mm(aq, sa, bq, sb, torch.bfloat16), iters) / 1e9
    return dict(dense_bf16_tflops=bf16, dense_fp8_rowwise_tflops=fp8_rate)


def expert_path(device, tokens, skewed, args):
    E, D, I, k = args.experts, args.hidden, args.inter, args.top_k
    x = torch.randn(tokens, D, device=device, dtype=torch.bfloat16)
    ids, w, balance = routing(tokens, E, k, skewed, device)
    bf16, q8 = make_experts(E, D, I, None, device), make_experts(E, D, I, FP8, device)
    P = tokens * k
    gemm1, gemm2 = 2 * P * D * 2 * I, 2 * P * I * D
    row = dict(tokens=tokens, pairs=P, routing="skewed" if skewed else "balanced", balance=balance)
    with torch.inference_mode():
        row["bf16_path_ms"] = timed(lambda: bf16(x, ids, w), args.iters)
        row["fp8_path_ms"] = timed(lambda: q8(x, ids, w), args.iters)
        row["speedup"] = row["bf16_path_ms"] / row["fp8_path_ms"]
        row["bf16_path_tflops"] = (gemm1 + gemm2) / row["bf16_path_ms"] / 1e9
        row["fp8_path_tflops"] = (gemm1 + gemm2) / row["fp8_path_ms"] / 1e9
        # The pieces, on rows already sorted by expert (what the module hands each step).
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        token, ws = order // k, w.flatten()[order]
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
        count = offs[-1:]
        row["sort_ms"] = timed(lambda: torch.argsort(flat, stable=True), args.iters)
        h = moe_kernels.gather_rows(x, token, count)
        g1 = _grouped_mm(h, bf16.up_gate_proj.transpose(-2, -1), offs)
        act = moe_kernels.swiglu(g1, ws, count)
        row["bf16_gemm1_tflops"] = gemm1 / timed(lambda: _grouped_mm(h, bf16.up_gate_proj.transpose(-2, -1), offs),
                                                 args.iters) / 1e9
        row["bf16_gemm2_tflops"] = gemm2 / timed(lambda: _grouped_mm(act, bf16.down_proj.transpose(-2, -1), offs),
                                                 args.iters) / 1e9
        row["gather_bf16_ms"] = timed(lambda: moe_kernels.gather_rows(x, token, count), args.iters)
        row["gather_quant_ms"] = timed(lambda: moe_kernels.gather_quant_rows(x, token, count), args.iters)
        row["gather_quant_eager_ms"] = timed(lambda: fp8.quantize_rows(x[token]), args.iters)
        hq, hs = moe_kernels.gather_quant_rows(x, token, count)
        g1q = fp8.scaled_grouped_mm(hq, hs, q8.up_gate_proj, q8.up_gate_proj_scale, offs, torch.bfloat16)
        aq, a_s = moe_kernels.swiglu_quant(g1q, ws, count)
        t1 = timed(lambda: fp8.scaled_grouped_mm(hq, hs, q8.up_gate_proj, q8.up_gate_proj_scale, offs, torch.bfloat16), args.iters)
        t2 = timed(lambda: fp8.scaled_grouped_mm(aq, a_s, q8.down_proj, q8.down_proj_scale, offs, torch.bfloat16), args.iters)
        row.update(fp8_gemm1_tflops=gemm1 / t1 / 1e9, fp8_gemm2_tflops=gemm2 / t2 / 1e9,
                   fp8_gemms_tflops=(gemm1 + gemm2) / (t1 + t2) / 1e9)
        row["swiglu_bf16_ms"] = timed(lambda: moe_kernels.swiglu(g1, ws, count), args.iters)
        row["swiglu_quant_ms"] = timed(lambda: moe_kernels.swiglu_quant(g1q, ws, count), args.iters)
        y_ref = bf16(x, ids, w)[0].float()
        row["fp8_vs_bf16_rel_err"] = float((q8(x, ids, w)[0].float() - y_ref).norm() / y_ref.norm())
    return row


def path_kernels(device, args):
    """Every kernel of one expert forward, bf16 and FP8, at the first --tokens count, balanced
    routing: microseconds per forward by kernel name (torch.profiler, mean of --iters)."""
    from torch.profiler import ProfilerActivity, profile
    E, D, I, k, tokens = args.experts, args.hidden, args.inter, args.top_k, args.tokens[0]
    x = torch.randn(tokens, D, device=device, dtype=torch.bfloat16)
    ids, w, _ = routing(tokens, E, k, False, device)
    out = {}
    for name, quant in (("bf16", None), ("fp8", FP8)):
        experts = make_experts(E, D, I, quant, device)
        with torch.inference_mode():
            for _ in range(3):
                experts(x, ids, w)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    experts(x, ids, w)
                torch.cuda.synchronize()
        kernels = {}
        for event in prof.key_averages():
            us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
            if event.device_type == torch.autograd.DeviceType.CUDA and us:
                kernels[event.key[:140]] = (us / args.iters, event.count // args.iters)
        out[name] = dict(sorted(kernels.items(), key=lambda kv: -kv[1][0]))
        total = sum(us for us, _ in kernels.values())
        print(f"{name} expert path, {tokens} tokens: {total / 1e3:.3f} ms of kernels per forward")
        for key, (us, calls) in out[name].items():
            print(f"  {us:9.1f} us  x{calls:<3d} {key}")
        del experts
        torch.cuda.empty_cache()
    return out


def dense(device, args):
    """Per layer at args.dense_tokens: QKV, O, shared expert up+gate and down."""
    M, D = args.dense_tokens, args.hidden
    heads, kv, hd = 32, 8, 128
    shapes = {"qkv_proj": ((heads + 2 * kv) * hd, D), "o_proj": (D, heads * hd),
              "shared up_gate_proj": (2 * args.inter, D), "shared down_proj": (D, args.inter)}
    rows = []
    with torch.inference_mode():
        for name, (N, K) in shapes.items():
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            wt = torch.randn(N, K, device=device, dtype=torch.bfloat16) * 0.02
            wq, ws = fp8.quantize_weight(wt)
            all_rows = torch.arange(M, device=device)
            count = torch.full((1,), M, dtype=torch.int32, device=device)
            t_bf16 = timed(lambda: F.linear(x, wt), args.iters)
            t_quant = timed(lambda: moe_kernels.gather_quant_rows(x, all_rows, count), args.iters)
            xq, xs = moe_kernels.gather_quant_rows(x, all_rows, count)
            t_gemm = timed(lambda: fp8.scaled_mm(xq, xs, wq, ws, torch.bfloat16), args.iters)
            flops = 2 * M * N * K
            rows.append(dict(projection=name, M=M, N=N, K=K, bf16_ms=t_bf16, fp8_quantize_ms=t_quant,
                             fp8_gemm_ms=t_gemm, fp8_total_ms=t_quant + t_gemm,
                             bf16_tflops=flops / t_bf16 / 1e9, fp8_gemm_tflops=flops / t_gemm / 1e9))
    return rows


def dispatch(device, args):
    T, D, k = args.dispatch_tokens, args.hidden, args.top_k
    x = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    ids, w, _ = routing(T, args.experts, k, False, device)
    token = torch.argsort(ids.flatten(), stable=True) // k
    count = torch.full((1,), T * k, dtype=torch.int32, device=device)
    with torch.inference_mode():
        bf16_side = timed(lambda: moe_kernels.gather_quant_rows(x, token, count), args.iters)
        pack = timed(lambda: quantize_tokens(x), args.iters)
        rows = quantize_tokens(x)
        unpack = timed(lambda: (moe_kernels.gather_rows(rows.q, token, count), rows.scale[token]), args.iters)
    wire = {}
    for name, quant in (("bf16", None), ("fp8", FP8)):
        r, row_values = experts_method(quant).pack_tokens(x[:1])
        meta = Dispatcher._metadata(ids[:1], w[:1], row_values)
        wire[name] = r.numel() * r.element_size() + meta.numel() * meta.element_size()
    return dict(tokens=T, bf16_rows_gather_quant_ms=bf16_side, fp8_pack_ms=pack, fp8_unpack_gather_ms=unpack,
                fp8_overhead_ms=pack + unpack - bf16_side, bytes_per_token_bf16=wire["bf16"],
                bytes_per_token_fp8=wire["fp8"])


def ep_buffers(device, args):
    """One rank of EP = n: 64/n local experts, n × T gathered rows; chunked buffers vs one buffer."""
    E, D, I, k, T = args.experts, args.hidden, args.inter, args.top_k, args.dispatch_tokens
    rows = []
    for n in (1, 2, 4, 8):
        local = E // n
        ids, w, _ = routing(n * T, E, k, False, device, seed=n)
        local_ids = torch.where(ids < local, ids, -1)  # this rank holds experts 0 .. local-1
        x = torch.randn(n * T, D, device=device, dtype=torch.bfloat16)
        for quant in (None, FP8):
            experts = make_experts(local, D, I, quant, device, num_experts=E)
            for sizing, capacity in (("chunked", experts_module.CHUNK_CAPACITY), ("every pair", 1e9)):
                saved = experts_module.CHUNK_CAPACITY
                experts_module.CHUNK_CAPACITY = capacity
                try:
                    with torch.inference_mode():
                        ms = timed(lambda: experts(x, local_ids, w), args.iters)
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        out = experts(x, local_ids, w)
                        torch.cuda.synchronize()
                        peak = torch.cuda.max_memory_allocated(device) - base
                        del out
                finally:
                    experts_module.CHUNK_CAPACITY = saved
                chunk_rows, chunks = experts_module.expert_chunks(n * T, k, local, E) if sizing == "chunked" else (
                    n * T * min(k, local), 1)
                rows.append(dict(ep=n, dtype="fp8" if quant else "bf16", sizing=sizing, gathered_rows=n * T,
                                 chunk_rows=chunk_rows, chunks=chunks, ms=ms, transient_GiB=peak / 2 ** 30))
            del experts
            torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--inter", type=int, default=3072)
    p.add_argument("--tokens", type=int, nargs="+", default=[4097, 8194, 16388])
    p.add_argument("--dense-tokens", type=int, default=8194)
    p.add_argument("--dispatch-tokens", type=int, default=4097)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sections", default="ceilings,experts,dense,dispatch,ep")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    sections = args.sections.split(",")
    res = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    if "ceilings" in sections:
        res["ceilings"] = ceilings(device, args.iters)
        print(json.dumps(res["ceilings"]), flush=True)
    if "experts" in sections:
        res["experts"] = []
        for tokens in args.tokens:
            for skewed in (False, True):
                res["experts"].append(expert_path(device, tokens, skewed, args))
                print(json.dumps(res["experts"][-1]), flush=True)
                torch.cuda.empty_cache()
    if "kernels" in sections:
        res["path_kernels"] = path_kernels(device, args)
    if "dense" in sections:
        res["dense"] = dense(device, args)
        for r in res["dense"]:
            print(json.dumps(r), flush=True)
    if "dispatch" in sections:
        res["dispatch"] = dispatch(device, args)
        print(json.dumps(res["dispatch"]), flush=True)
    if "ep" in sections:
        res["ep_buffers"] = ep_buffers(device, args)
        for r in res["ep_buffers"]:
            print(json.dumps(r), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_experts.json"), "w") as f:
            json.dump(dict(args=vars(args), **res), f, indent=1)
    print_tables(res)


def print_tables(res):
    if "experts" in res:
        print("| tokens | routing (max/mean) | bf16 path ms | FP8 path ms | × | FP8 GEMM1 / GEMM2 TFLOP/s | "
              "bf16 GEMM1 / GEMM2 | gather+quant / eager ms | rel err |")
        for r in res["experts"]:
            print(f"| {r['tokens']} | {r['routing']} ({r['balance']:.2f}) | {r['bf16_path_ms']:.2f} | "
                  f"{r['fp8_path_ms']:.2f} | {r['speedup']:.2f} | {r['fp8_gemm1_tflops']:.0f} / "
                  f"{r['fp8_gemm2_tflops']:.0f} | {r['bf16_gemm1_tflops']:.0f} / {r['bf16_gemm2_tflops']:.0f} | "
                  f"{r['gather_quant_ms']:.3f} / {r['gather_quant_eager_ms']:.3f} | {r['fp8_vs_bf16_rel_err']:.3f} |")
    if "dense" in res:
        print("| projection | bf16 ms | FP8 quantize + GEMM ms |")
        for r in res["dense"]:
            print(f"| {r['projection']} | {r['bf16_ms']:.3f} | {r['fp8_quantize_ms']:.3f} + {r['fp8_gemm_ms']:.3f} |")
    if "ep_buffers" in res:
        print("| EP | dtype | sizing | chunks × rows | ms | transient GiB |")
        for r in res["ep_buffers"]:
            print(f"| {r['ep']} | {r['dtype']} | {r['sizing']} | {r['chunks']} × {r['chunk_rows']} | {r['ms']:.2f} | "
                  f"{r['transient_GiB']:.2f} |")


if __name__ == "__main__":
    main()
