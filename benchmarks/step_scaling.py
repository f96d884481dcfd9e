"""Seconds per denoising step by layout: one GPU against 2- and 4-GPU layouts, both EP backends.

    python benchmarks/step_scaling.py --layers 8 --steps 6 --out results/

A release-width HunyuanImage-3.0 (hidden 4096, 64 experts top-8) cut to --layers so that it fits
on one GPU, dummy weights, 1024×1024, guidance on. Per layout: mean step time over steps 2..N
(the first includes warm-up), model FLOP utilisation (`step_flops`) against the dense bf16 matmul
rate measured in the same run, and peak memory per GPU. Writes step_scaling_<layers>layers.json and,
where matplotlib is installed, step_scaling_<layers>layers.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile

import torch

from epdiff.config import ParallelConfig
from epdiff.engine import Engine, EngineConfig, SamplingParams
from epdiff.models.hunyuan_image3.config import HunyuanImage3Config
from epdiff.models.hunyuan_image3.make_tiny import make_tiny
from moe_layer import dense_tflops  # same folder: one measurement of the dense ceiling

LAYOUTS = [  # (name, ParallelConfig kwargs)
    ("1 GPU", {}),
    ("TP2", dict(tensor_parallel_size=2)),
    ("TP2+EP", dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("CFG2+EP agrs", dict(cfg_parallel_size=2, enable_expert_parallel=True)),
    ("CFG2+EP a2a", dict(cfg_parallel_size=2, enable_expert_parallel=True, all2all_backend="alltoall")),
    ("SP2+EP agrs", dict(sequence_parallel_size=2, enable_expert_parallel=True)),
    ("SP2+EP a2a", dict(sequence_parallel_size=2, enable_expert_parallel=True, all2all_backend="alltoall")),
    ("TP4+EP", dict(tensor_parallel_size=4, enable_expert_parallel=True)),
    ("CFG2×TP2+EP agrs", dict(cfg_parallel_size=2, tensor_parallel_size=2, enable_expert_parallel=True)),
    ("CFG2×SP2+EP agrs", dict(cfg_parallel_size=2, sequence_parallel_size=2, enable_expert_parallel=True)),
    ("SP4+EP agrs", dict(sequence_parallel_size=4, enable_expert_parallel=True)),
]


def release_width_model(layers: int, variant: str = "base") -> str:
    """Configs and tokenizer of HunyuanImage-3.0 (or its `variant`: instruct, instruct-distil) at
    release width with `layers` layers (no weights: run with load_format='dummy')."""
    return make_tiny(tempfile.mkdtemp(), hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32,
                     num_key_value_heads=8, num_experts=64, moe_topk=8, moe_intermediate_size=3072,
                     image_base_size=1024, patch_embed_hidden_dim=1024, vocab_size=133120, vae="release",
                     config_only=True, variant=variant)


def step_flops(config: HunyuanImage3Config, image_tokens: int, prefix_tokens: int, branches: int) -> float:
    """Matmul and convolution FLOPs of one denoising step (all layers, all branches): projections,
    router, routed and shared experts, attention of <timestep> and the image queries, and the UNet
    convolutions of patch_embed and final_layer (2 FLOP per weight per pixel). Element-wise work
    (norms, RoPE, activations, GroupNorm) is left out."""
    D, hd, H, KV = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
    tokens = image_tokens + 1  # <timestep> + image
    total = 0.0
    for layer in range(config.num_hidden_layers):
        I, k = config.moe_intermediate_size[layer], config.moe_topk[layer]
        per_token = (2 * D * (H + 2 * KV) * hd + 2 * H * hd * D  # qkv, o
                     + 2 * D * config.num_experts  # router
                     + (k * 6 * D * I) + 6 * D * config.shared_intermediate_size(layer))  # experts, shared
        attention = 4 * H * hd * tokens * (prefix_tokens + tokens)  # QK^T and PV
        total += tokens * per_token + attention
    C, mid = config.latent_channels, config.patch_embed_hidden_dim
    unet_weights = (9 * C * mid + 9 * mid * D + 9 * D * D + mid * D  # patch_embed: conv, ResBlock (+ 1×1 skip)
                    + 9 * D * mid + 9 * mid * mid + D * mid + 9 * mid * C)  # final_layer: ResBlock, conv
    total += 2 * unet_weights * image_tokens
    return total * branches


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--layouts", default=None,
                   help="comma-separated layout names to run (default: every one that fits the GPUs)")
    p.add_argument("--out", default=".")
    p.add_argument("--quantization", default=None, choices=("fp8",))
    args = p.parse_args()
    wanted = None if args.layouts is None else args.layouts.split(",")
    if wanted and not set(wanted) <= {name for name, _ in LAYOUTS}:
        p.error(f"unknown layouts {sorted(set(wanted) - {name for name, _ in LAYOUTS})}; "
                f"choose from {[name for name, _ in LAYOUTS]}")
    os.makedirs(args.out, exist_ok=True)
    model = release_width_model(args.layers)
    config = HunyuanImage3Config.from_pretrained(model)
    rate = dense_tflops(torch.device("cuda")) * 1e12
    rows = []
    for name, kwargs in LAYOUTS:
        if ParallelConfig(**kwargs).world_size > torch.cuda.device_count() or (wanted and name not in wanted):
            continue
        engine_config = EngineConfig(model, load_format="dummy", quantization=args.quantization,
                                     parallel=ParallelConfig(**kwargs))
        with Engine(engine_config, decode=False) as engine:
            params = SamplingParams("a cup of coffee on the table", height=args.size, width=args.size,
                                    num_inference_steps=args.steps, guidance_scale=5.0)
            out = engine.generate(params)
            metrics = engine.rank_metrics
        gc.collect()
        torch.cuda.empty_cache()  # the 1-GPU run is in this process: free its cache for the workers
        steps = out.step_seconds[1:]
        step = statistics.mean(steps)
        grid = (out.params.height // 16) * (out.params.width // 16)
        flops = step_flops(config, grid, prefix_tokens=12, branches=2)
        gpus = len(metrics)
        rows.append(dict(layout=name, gpus=gpus, step_s=step, step_s_std=statistics.pstdev(steps),
                         image_s_50_steps=50 * step, mfu=flops / step / (rate * gpus),
                         peak_GiB=max(m["peak_memory_bytes"] for m in metrics) / 2**30))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["step_s"] if rows[0]["gpus"] == 1 else float("nan")
    for r in rows:
        r["vs_1_gpu"] = r["step_s"] / base
    name = f"step_scaling_{args.layers}layers"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(dict(layers=args.layers, size=args.size, dense_tflops=rate / 1e12, results=rows), f, indent=1)
    print(f"dense bf16: {rate / 1e12:.0f} TFLOP/s")
    print("| layout | GPUs | s/step | × 1 GPU | s/image (50 steps) | MFU | peak GiB |")
    for r in rows:
        print(f"| {r['layout']} | {r['gpus']} | {r['step_s']:.3f} ± {r['step_s_std']:.3f} | {r['vs_1_gpu']:.2f} | "
              f"{r['image_s_50_steps']:.1f} | {100 * r['mfu']:.0f} % | {r['peak_GiB']:.1f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["layout"] for r in rows][::-1], [r["step_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel(f"seconds per step ({args.layers} layers, {args.size}², guidance on, H200)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, name + ".png"), dpi=120)


if __name__ == "__main__":
    main()
