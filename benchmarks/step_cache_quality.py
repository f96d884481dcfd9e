"""Step caching's cost in quality and its gain in model calls, on the built-in model (CPU is fine):
the 40 held-out prompts x seeds, each cache setting against the uncached images of the same run.

    python benchmarks/step_cache_quality.py --steps 50 --seeds 0 1 2

Per setting: full steps of --steps, the wall time per image relative to no cache (same process,
same machine), PSNR against the uncached image (mean and worst), and the strict checker's score.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from epdiff.engine import ImageGenerator
from epdiff.sampling.step_cache import StepCacheConfig
from epdiff.train import checker
from epdiff.train.score import captions

SETTINGS = [("none", StepCacheConfig()),
            ("taylor i3 o2", StepCacheConfig("taylor", interval=3, order=2)),
            ("taylor i4 o2", StepCacheConfig("taylor", interval=4, order=2)),
            ("taylor i5 o2 (reference default)", StepCacheConfig("taylor", interval=5, order=2)),
            ("taylor i5 o1", StepCacheConfig("taylor", interval=5, order=1)),
            ("taylor i6 o2", StepCacheConfig("taylor", interval=6, order=2)),
            ("fbcache t0.04", StepCacheConfig("fbcache", threshold=0.04)),
            ("fbcache t0.08 (default)", StepCacheConfig("fbcache", threshold=0.08)),
            ("fbcache t0.15", StepCacheConfig("fbcache", threshold=0.15))]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", nargs="+", default=None, help="run only the settings whose names start so")
    args = parser.parse_args()
    prompts = captions(args.num_prompts)
    rows, baseline = [], {}
    with ImageGenerator(max_batch_size=8) as generator:
        for name, cache in SETTINGS:
            if args.only and name != "none" and not any(name.startswith(o) for o in args.only):
                continue
            images, start = {}, time.perf_counter()
            for seed in args.seeds:
                for k, out in enumerate(generator.generate_outputs(prompts, num_inference_steps=args.steps,
                                                                     seed=seed, cache=cache)):
                    images[seed, k] = out.images[0]
            seconds = time.perf_counter() - start
            if not baseline:
                baseline = {"seconds": seconds, "images": images}
            scores = checker.summarize([checker.score(prompts[k], image.to_pil()) for (_, k), image in images.items()])
            quality = [psnr(image.pixels, baseline["images"][key].pixels) for key, image in images.items()]
            finite = [q for q in quality if math.isfinite(q)]
            full = sorted(image.full_steps for image in images.values())
            row = dict(setting=name, full_steps=f"{full[0]}-{full[-1]}" if full[0] != full[-1] else str(full[0]),
                       steps=args.steps,
                       speedup=baseline["seconds"] / seconds,
                       psnr_mean=float(np.mean(finite)) if finite else math.inf,
                       psnr_min=min(quality), identical=len(quality) - len(finite),
                       accuracy=scores["accuracy"], exact=scores["exact"], extra=scores["extra"], images=len(images))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| setting | full steps | speed-up (wall) | PSNR vs uncached, mean / worst | attributes | exact scenes | extra |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['full_steps']} of {r['steps']} | {r['speedup']:.2f}x | "
              f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f} dB | {r['accuracy']:.1%} | {r['exact']:.1%} | {r['extra']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
