"""MoE layer at HunyuanImage-3.0 shapes: EP=1 (one GPU) against EP over 2 or 4 GPUs, both backends.

    python benchmarks/moe_layer.py --out results/          # spawns one worker per GPU (≤ 4)

Per case: time per layer (CUDA events, mean and spread over --iters after warm-up), the pieces
(router, dispatch, experts, combine) timed on their own, TFLOP/s of the expert GEMMs, bytes
and bus bandwidth of dispatch and combine beside the raw NCCL collective of the same size, peak
memory, and the routing balance (busiest expert ÷ mean) it ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from epdiff.config import ParallelConfig
from epdiff.distributed import collectives as C
from epdiff.distributed.launch import launch
from epdiff.distributed.parallel_state import ParallelState
from epdiff.moe import MoELayer
from epdiff.moe.dispatch import AllGatherReduceScatter


def cuda_time(fn, iters: int, group=None, warmup: int = 3) -> tuple[float, float]:
    """Mean and standard deviation of fn() in ms, by CUDA events, after warm-up. With a group,
    its ranks line up before each iteration, so a collective's time excludes waiting for peers."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if group is not None and group.size > 1:
            dist.barrier(group=group.process_group)
        if not torch.cuda.is_available():  # CPU dry run of the script itself: wall clock
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.mean(times), statistics.pstdev(times)


def balanced_routing(tokens: int, experts: int, top_k: int, device, seed: int):
    """Every expert gets exactly tokens·k/E pairs, k distinct experts per token."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    stride = experts // top_k
    base = torch.randperm(tokens, generator=g) % stride
    ids = base[:, None] + stride * torch.arange(top_k)[None, :]
    ids = torch.randperm(experts, generator=g)[ids]  # which experts are "neighbours" is random
    weights = torch.rand(tokens, top_k, generator=g) + 0.5
    return ids.to(device), (weights / weights.sum(-1, keepdim=True)).to(device)


def collective_bus_GBps(nbytes: int, ms: float, n: int) -> float:
    """nccl-tests bus bandwidth for all-gather / reduce-scatter / all-to-all of nbytes total."""
    return nbytes * (n - 1) / n / ms / 1e6


def case(device, args, config: ParallelConfig | None):
    """One layout. config None = EP=1 on global rank 0 alone."""
    alone = config is None
    state = ParallelState.single(device) if alone else ParallelState.build(config, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    layer = MoELayer(args.hidden, args.experts, args.top_k, args.inter, state,
                     shared_intermediate_size=args.inter, dtype=torch.bfloat16, device=device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    # Distinct tokens per token-group rank, identical within a TP group.
    seed = 1 + state.token.rank
    x = torch.randn(args.tokens, args.hidden, device=device,
                    generator=torch.Generator(device).manual_seed(seed)).to(torch.bfloat16)
    if args.routing == "balanced":
        ids, w = balanced_routing(args.tokens, args.experts, args.top_k, device, seed)
        layer.gate.forward = lambda _x: (ids, w)
    else:
        ids, w = layer.gate(x)
    counts = [args.tokens] * state.token.size
    sync = None if alone else state.ep
    d = layer.dispatch
    with torch.inference_mode():
        total = cuda_time(lambda: layer(x), args.iters, sync)  # counts exchanged on its first call only
        router = cuda_time(lambda: layer.gate(x), args.iters, sync)
        disp = cuda_time(lambda: d.dispatch(x, ids, w, layer.placement, counts), args.iters, sync)
        rows, local_ids, row_w, handle = d.dispatch(x, ids, w, layer.placement, counts)
        experts = cuda_time(lambda: layer.experts(rows, local_ids, row_w), args.iters, sync)
        y, _ = layer.experts(rows, local_ids, row_w)
        comb = cuda_time(lambda: d.combine(y, handle), args.iters, sync)
        shared = cuda_time(lambda: layer.shared_expert(x), args.iters, sync)
        layer.reset_routing_stats()
        layer(x)
    pairs = int((local_ids >= 0).sum())
    load = layer.expert_load.clone()
    if not alone:
        C.all_reduce(load, state.ep)
    flops = pairs * 6 * args.hidden * (args.inter // layer.expert_tp)
    row = dict(layout="EP=1 (1 GPU)" if alone else config.describe(), dispatcher=type(d).__name__,
               tokens_per_rank=args.tokens, routing=args.routing,
               routing_balance=float(load.max() / load.float().mean()),
               layer_ms=total[0], layer_ms_std=total[1], router_ms=router[0], dispatch_ms=disp[0],
               experts_ms=experts[0], combine_ms=comb[0], shared_expert_ms=shared[0],
               expert_pairs=pairs, expert_tflops=flops / experts[0] / 1e9,
               peak_memory_GiB=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    group = d.group if hasattr(d, "group") else None
    if group is not None and group.size > 1:
        n = group.size
        x_bytes = x.numel() * x.element_size()
        if isinstance(d, AllGatherReduceScatter):
            moved = n * x_bytes  # all-gather output = reduce-scatter input
            out = torch.empty(n * args.tokens, args.hidden, device=device, dtype=x.dtype)
            x = x.contiguous()
            raw_d = cuda_time(lambda: C._all_gather_single(out, x, group=group.process_group), args.iters, sync)
            raw_c = cuda_time(lambda: dist.reduce_scatter_tensor(torch.empty_like(x), out, group=group.process_group),
                              args.iters)
            names = ("all_gather", "reduce_scatter")
            moved_d = moved_c = moved
        else:
            # nccl-tests' all-to-all size: this rank's send buffer (token rows only; routing metadata is extra).
            moved_d = sum(handle[3]) * args.hidden * x.element_size()
            moved_c = sum(handle[4]) * args.hidden * x.element_size()
            send = torch.empty(sum(handle[3]), args.hidden, device=device, dtype=x.dtype)
            back = torch.empty(sum(handle[4]), args.hidden, device=device, dtype=x.dtype)
            raw_d = cuda_time(lambda: C.all_to_all_rows(send, handle[3], handle[4], group), args.iters, sync)
            raw_c = cuda_time(lambda: C.all_to_all_rows(back, handle[4], handle[3], group), args.iters, sync)
            names = ("all_to_all_dispatch", "all_to_all_combine")
        row.update(dispatch_bytes=moved_d, combine_bytes=moved_c,
                   dispatch_busbw_GBps=collective_bus_GBps(moved_d, disp[0], n),
                   combine_busbw_GBps=collective_bus_GBps(moved_c, comb[0], n),
                   **{f"nccl_{names[0]}_ms": raw_d[0], f"nccl_{names[1]}_ms": raw_c[0],
                      f"nccl_{names[0]}_busbw_GBps": collective_bus_GBps(moved_d, raw_d[0], n),
                      f"nccl_{names[1]}_busbw_GBps": collective_bus_GBps(moved_c, raw_c[0], n)})
    return row


def dense_tflops(device, n=8192, iters=10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms, _ = cuda_time(lambda: a @ b, iters)
    return 2 * n**3 / ms / 1e9


def worker(device, args):
    rows = []
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        if device.type == "cuda":
            rows.append(dict(layout="dense bf16 matmul 8192³", tflops=dense_tflops(device)))
        rows.append(case(device, args, None))
    if dist.is_initialized():
        dist.barrier()
    if world > 1:
        for backend in ("allgather_reducescatter", "alltoall"):
            rows.append(case(device, args, ParallelConfig(data_parallel_size=world, enable_expert_parallel=True,
                                                           all2all_backend=backend)))
        rows.append(case(device, args, ParallelConfig(tensor_parallel_size=world, enable_expert_parallel=True)))
    if world == 4:
        rows.append(case(device, args, ParallelConfig(tensor_parallel_size=2, data_parallel_size=2,
                                                       enable_expert_parallel=True)))
    return rows if rank == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--inter", type=int, default=3072, help="expert (and shared expert) width")
    p.add_argument("--routing", choices=("balanced", "random"), default="balanced",
                   help="balanced: every expert gets tokens·k/E pairs; random: a std-0.02 router on random tokens")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--gpus", type=int, default=None, help="EP size of the multi-GPU cases (default: all, at most 4)")
    p.add_argument("--cpu-ranks", type=int, default=0, help="dry run on CPU with this many gloo ranks")
    p.add_argument("--out", default=None, help="folder for moe_layer_<routing>.json")
    args = p.parse_args()
    world = min(args.gpus or 4, torch.cuda.device_count()) or args.cpu_ranks
    if world < 1:
        sys.exit("moe_layer.py needs a CUDA GPU (or --cpu-ranks N for a dry run of the script)")
    rows = launch(world, worker, args)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"moe_layer_{args.routing}.json"), "w") as f:
            json.dump(dict(args=vars(args), results=rows), f, indent=1)


if __name__ == "__main__":
    main()
