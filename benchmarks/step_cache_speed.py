"""Step caching at release width on one GPU: wall time per 50-step image for each cache setting,
against no cache in the same process.

    python benchmarks/step_cache_speed.py --layers 8 --out results/                    # bf16 (fits an H100)
    python benchmarks/step_cache_speed.py --layers 32 --quantization fp8 --out results/  # the release: H200

HunyuanImage-3.0 at release width (hidden 4096, 64 experts top-8) cut to --layers, dummy weights,
1024x1024, guidance on, the engine's own loop (latents only: the VAE is not timed). Per setting:
full steps of 50, seconds per image (mean of --images after one warm-up image), speed-up over no
cache, and how far the final latents move from the uncached ones (relative L2 and a latent PSNR
over the uncached latents' range). Random weights make the image meaningless, so image quality comes
from the built-in model's table (step_cache_quality.py); this run gives the time a skipped step
saves on real widths, where the MoE layer and not the Python loop is the cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from epdiff.engine import Engine, EngineConfig, SamplingParams
from epdiff.sampling.step_cache import StepCacheConfig
from step_scaling import release_width_model  # same folder: the release-width configs

SETTINGS = [("none", StepCacheConfig()),
            ("taylor i5 o1", StepCacheConfig("taylor", interval=5, order=1)),
            ("taylor i5 o2 (reference default)", StepCacheConfig("taylor", interval=5, order=2)),
            ("taylor i3 o2", StepCacheConfig("taylor", interval=3, order=2)),
            ("fbcache t0.08 (default)", StepCacheConfig("fbcache", threshold=0.08)),
            ("fbcache t0.15", StepCacheConfig("fbcache", threshold=0.15))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--images", type=int, default=2, help="timed images per setting (after one warm-up image)")
    p.add_argument("--quantization", default=None, choices=("fp8",))
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None, help="a checkpoint folder instead (a smoke run of the script on CPU)")
    args = p.parse_args()
    model = args.model or release_width_model(args.layers)
    config = EngineConfig(model, load_format="dummy" if args.model is None else "safetensors", quantization=args.quantization)
    rows, baseline = [], None
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with Engine(config, decode=False) as engine:
        def run(cache, seed):
            params = SamplingParams("a cup of coffee on the table", height=args.size, width=args.size,
                                    num_inference_steps=args.steps, guidance_scale=5.0, seed=seed, cache=cache)
            sync()
            start = time.perf_counter()
            out = engine.generate(params)
            sync()
            return time.perf_counter() - start, out.images[0]

        run(StepCacheConfig(), 99)  # warm-up: kernels, allocator
        for name, cache in SETTINGS:
            run(cache, 99)  # this setting's own first image (its extra buffers) is not timed
            results = [run(cache, seed) for seed in range(args.images)]
            seconds = statistics.mean(t for t, _ in results)
            latents = [image.latents.float() for _, image in results]
            if baseline is None:
                baseline = dict(seconds=seconds, latents=latents)
            rel = [float((a - b).norm() / b.norm()) for a, b in zip(latents, baseline["latents"])]
            peak = [float(b.max() - b.min()) for b in baseline["latents"]]
            mse = [float(((a - b) ** 2).mean()) for a, b in zip(latents, baseline["latents"])]
            psnr = [math.inf if m == 0 else 10 * math.log10(r ** 2 / m) for m, r in zip(mse, peak)]
            rows.append(dict(setting=name, layers=args.layers, quantization=args.quantization or "bf16",
                             steps=args.steps, full_steps=[image.full_steps for _, image in results],
                             image_s=seconds, image_s_std=statistics.pstdev(t for t, _ in results),
                             speedup=baseline["seconds"] / seconds, latent_rel_l2=max(rel),
                             latent_psnr_min=min(psnr), device=torch.cuda.get_device_name() if cuda else "cpu",
                             peak_GiB=max(m["peak_memory_bytes"] or 0 for m in engine.rank_metrics) / 2 ** 30))
            print(json.dumps(rows[-1]), flush=True)
    print("| setting | full steps | s/image | speed-up | latent rel. L2 | latent PSNR (worst) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['full_steps'][0]} of {r['steps']} | {r['image_s']:.2f} ± {r['image_s_std']:.2f} | "
              f"{r['speedup']:.2f}x | {r['latent_rel_l2']:.4f} | {r['latent_psnr_min']:.1f} dB |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        name = f"step_cache_speed_{args.layers}layers_{args.quantization or 'bf16'}.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
