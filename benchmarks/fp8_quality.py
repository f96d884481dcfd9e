"""Quality of FP8 experts on the built-in shapes model: the held-out score (what `epdiff score`
computes: generate the held-out prompts, prompt i with seed + i, check every image) with and
without FP8, on the same prompts and seeds, and the PSNR of each FP8 image against its
unquantized twin.

    python benchmarks/fp8_quality.py --out results/          # GPU: bf16 against FP8 on Hopper kernels
    python benchmarks/fp8_quality.py --device cpu            # CPU: fp32 against FP8 (fp32 fallback GEMMs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np

from compare_images import psnr
from epdiff.engine import ImageGenerator
from epdiff.train import checker
from epdiff.train.score import captions as shape_captions


def run(quantization, args):
    images, scores = {}, []
    with ImageGenerator(args.model, dtype=args.dtype, device=args.device, quantization=quantization) as generator:
        captions = shape_captions(args.num_prompts)
        for seed in args.seed:
            images[seed] = generator.generate(captions, seed=seed)
            scores += [checker.score(text, image) for text, image in zip(captions, images[seed])]
    return images, checker.summarize(scores)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the built-in model")
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    base_images, base = run(None, args)
    fp8_images, quant = run("fp8", args)
    psnrs = [psnr(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
             for seed in args.seed for a, b in zip(base_images[seed], fp8_images[seed])]
    finite = [v for v in psnrs if np.isfinite(v)]
    res = dict(device=args.device, dtype=args.dtype, prompts=args.num_prompts, seeds=args.seed,
               unquantized_accuracy=base["accuracy"], fp8_accuracy=quant["accuracy"],
               points=100 * (quant["accuracy"] - base["accuracy"]),
               unquantized_exact=base["exact"], fp8_exact=quant["exact"],
               unquantized_report=base["report"], fp8_report=quant["report"],
               psnr_mean_db=statistics.mean(finite) if finite else float("inf"),
               psnr_min_db=min(psnrs), psnr_identical_images=len(psnrs) - len(finite), images=len(psnrs))
    print(json.dumps(res, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_quality.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
