"""Where a denoising step's GPU time goes, on one GPU: kernel time by kind and the top kernels.

    python benchmarks/profile_step.py --layers 8 --out results/
    python benchmarks/profile_step.py --layers 20 --variant instruct-distil --quantization fp8

The release-width model of step_scaling.py (dummy weights, 1024², the model's guidance: the base
model's both branches in one batch, Instruct-Distil's one), run in this process under torch.profiler for --steps steps after one warm-up
request. Kernels are grouped by name into dense GEMM, grouped GEMM, attention, NCCL, Triton
and the rest; the JSON holds per-kind milliseconds per step and the 30 longest kernels, and the
step time with each of torch's attention backends forced in turn.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine import EngineConfig, SamplingParams
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.planner import work_items
from step_scaling import release_width_model  # same folder

KINDS = [  # first match wins
    ("grouped GEMM", r"grouped|Grouped|GroupProblemShape"),
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv", r"fprop|conv|implicit|nchwToNhwc|nhwcToNchw"),
    ("NCCL", r"nccl"),
    ("Triton", r"^triton|_kernel$"),
    ("dense GEMM", r"gemm|cutlass|sm90|nvjet|xmma|cublas"),
    ("norm", r"norm"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name):
            return kind
    return "other"


def mean_step_ms(metrics) -> float:
    """Mean of the last batch's steps, in ms."""
    return sum(metrics.step_seconds) / len(metrics.step_seconds) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--variant", default="base", choices=("base", "instruct", "instruct-distil"))
    p.add_argument("--quantization", default=None, choices=("fp8",))
    p.add_argument("--out", default=".")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    config = EngineConfig(release_width_model(args.layers, args.variant), load_format="dummy", device="cuda",
                          quantization=args.quantization).resolve()
    params = SamplingParams("a cup of coffee on the table", height=args.size, width=args.size,
                            num_inference_steps=args.steps).resolve(config)
    parallel = ParallelState.single(device)
    model = config.model_info.load_pipeline(parallel, torch.bfloat16, "dummy", args.quantization, decode=False)
    metrics = RankMetrics(0, "1 GPU")
    items = work_items(0, params)

    def pipe(items):  # the engine's loop on one GPU
        return denoise(model, items, parallel, metrics)

    pipe(items)  # warm-up: allocator, kernels' first launches
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe(items)
    by_kind, by_name = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.device_type != torch.autograd.DeviceType.CUDA or not us:
            continue
        by_kind[kind_of(event.key)] += us / 1e3 / args.steps
        by_name[event.key] += us / 1e3 / args.steps
    wall = mean_step_ms(metrics)
    total = sum(by_kind.values())
    print(f"step {wall:.1f} ms wall, {total:.1f} ms of kernels ({args.variant}, {args.layers} layers, "
          f"{args.size}², {args.quantization or 'bf16'})")
    for kind, ms in by_kind.most_common():
        print(f"  {kind:14s} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    print("longest kernels (ms per step):")
    for name, ms in by_name.most_common(30):
        print(f"  {ms:8.2f}  {name[:150]}")
    backends = {}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                pipe(items)
            backends[backend] = mean_step_ms(metrics)
        except RuntimeError as e:
            backends[backend] = f"unavailable: {str(e).splitlines()[0][:120]}"
        print(f"attention backend {backend}: {backends[backend]} ms per step")
    unet = {}
    for fmt in ("contiguous_format", "channels_last"):  # the UNet convolutions' weight layout
        for module in (model.transformer.patch_embed, model.transformer.final_layer):
            module.to(memory_format=getattr(torch, fmt))
        pipe(items)
        unet[fmt] = mean_step_ms(metrics)
        print(f"UNet weights {fmt}: {unet[fmt]:.1f} ms per step")
    with open(os.path.join(args.out, f"profile_step_{args.variant}_{args.quantization or 'bf16'}.json"), "w") as f:
        json.dump(dict(variant=args.variant, quantization=args.quantization, layers=args.layers, size=args.size, step_ms=wall, kernel_ms=total,
                       by_kind=dict(by_kind.most_common()), top=by_name.most_common(30),
                       step_ms_by_attention_backend=backends, step_ms_by_unet_layout=unet), f, indent=1)


if __name__ == "__main__":
    main()
