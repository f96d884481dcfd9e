"""Where one image's time goes on one GPU, in-process: prefill (an edit's: the input image's VAE
encode, SigLIP2 and the longer prefix), each denoising step, the VAE decode and the PNG encode,
each timed with the GPU synchronised around it.

    python benchmarks/image_breakdown.py --layers 32 --variant instruct-distil --quantization fp8

HunyuanImage-3.0 (or a --variant) at release width cut to --layers, dummy weights, 1024x1024, the
model's default steps and guidance, the engine's own loop (engine/denoise.py). The first image is a
warm-up; the table is the mean of --images more. Writes image_breakdown.json to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import statistics
import time

import numpy as np
import torch
from PIL import Image

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.files import image_metadata, write_image
from epdiff.models.base import ImageTask
from epdiff.models.registry import model_info
from step_scaling import release_width_model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timed:
    """Wraps a method: each call's seconds, the GPU synchronised before and after."""

    def __init__(self, owner, name: str):
        self.seconds, method = [], getattr(owner, name)

        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            sync()
            self.seconds.append(time.perf_counter() - start)
            return out

        setattr(owner, name, timed)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--variant", default="instruct-distil", choices=("base", "instruct", "instruct-distil"))
    p.add_argument("--quantization", default="fp8", choices=("fp8", "none"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--edit", action="store_true", help="an edit: one input image of --size (Instruct variants)")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None, help="a checkpoint folder instead (a smoke run of the script on CPU)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (the steps before they were captured)")
    p.add_argument("--profile", action="store_true",
                   help="then profile one more image's start (prefill) with a prompt of a new length: host and GPU")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    info = model_info(args.model or release_width_model(args.layers, args.variant))
    state = ParallelState.single(torch.device("cuda" if cuda else "cpu"))
    start = time.perf_counter()
    pipe = info.load_pipeline(state, torch.bfloat16 if cuda else torch.float32,
                              "dummy" if args.model is None else "safetensors", None if args.quantization == "none" else args.quantization,
                              True)
    load_s = time.perf_counter() - start
    pipe.use_cuda_graphs = not args.enforce_eager
    prefill, decode = Timed(pipe, "start_batch"), Timed(pipe, "decode")  # start_batch: tokenize, noise, input images, prefill
    images = ()
    if args.edit:  # a photo-like input: smooth colour gradients and noise
        y, x = np.mgrid[:args.size, :args.size] / args.size
        pixels = np.stack([x, y, 1 - x * y], -1) * 200 + np.random.default_rng(0).normal(0, 20, (args.size,) * 2 + (3,))
        images = (Image.fromarray(pixels.clip(0, 255).astype(np.uint8)),)
    task = ImageTask("a cup of coffee on a wooden table", seed=0, height=args.size, width=args.size,
                     num_inference_steps=info.default_num_inference_steps,
                     guidance_scale=info.default_guidance_scale, system_prompt=info.resolve_system_prompt(None),
                     images=images)
    rows = []
    for k in range(args.images + 1):
        metrics = RankMetrics(rank=0, layout="1 GPU")
        sync()
        start = time.perf_counter()
        image = denoise(pipe, [task], state, metrics)[0]
        sync()
        denoise_s = time.perf_counter() - start
        start = time.perf_counter()
        buffer = io.BytesIO()
        write_image(buffer, "PNG", image.pixels.numpy(), {"prompt": task.prompt})
        png_s = time.perf_counter() - start
        row = dict(prefill_s=prefill.seconds[-1], steps=len(metrics.step_seconds),
                   step_s=statistics.mean(metrics.step_seconds), steps_s=sum(metrics.step_seconds),
                   decode_s=decode.seconds[-1], png_s=png_s, image_s=denoise_s + png_s)
        row["other_s"] = denoise_s - row["prefill_s"] - row["steps_s"] - row["decode_s"]
        print(("warm-up " if k == 0 else "") + json.dumps(row), flush=True)
        if k:
            rows.append(row)
    if args.profile:
        profile_prefill(pipe, task, state)
    mean = {key: statistics.mean(r[key] for r in rows) for key in rows[0]}
    result = dict(layers=args.layers, variant=args.variant, edit=args.edit, quantization=args.quantization, size=args.size,
                  cuda_graphs=not args.enforce_eager,
                  steps=task.num_inference_steps, guidance=task.guidance_scale, load_s=load_s,
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                  mean=mean, images=rows)
    print(f"| {args.variant}{' edit' if args.edit else ''}, {args.layers} layers, {args.quantization}{' eager' if args.enforce_eager else ', graphs'} | prefill {mean['prefill_s']:.3f} s | "
          f"{mean['steps']:.0f} steps × {mean['step_s']:.3f} s | decode {mean['decode_s']:.3f} s | "
          f"PNG {mean['png_s']:.3f} s | other {mean['other_s']:.3f} s | image {mean['image_s']:.3f} s |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "image_breakdown.json"), "w") as f:
            json.dump(result, f, indent=1)


def profile_prefill(pipe, task: ImageTask, state: ParallelState):
    """One batch start (tokenize, input images, prefill) under torch.profiler, with a prompt of a
    length not seen before (as a server's requests come): its wall time, the GPU's busy time,
    and the host's and the GPU's longest operations."""
    from torch.profiler import ProfilerActivity, profile

    fresh = dataclasses.replace(task, prompt=task.prompt + " in the morning light, seen from above")
    branches = list(range(pipe.info.num_guidance_branches(task.guidance_scale)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        with torch.inference_mode():
            pipe.start_batch([fresh], branches, None)
        sync()
    wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in gpu) / 1e3
    print(f"prefill profile: {wall:.1f} ms wall (profiled), {busy:.1f} ms of GPU kernels")
    print("  host, self time (ms, calls):")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]:
        print(f"    {e.self_cpu_time_total / 1e3:8.2f} {e.count:6d}  {e.key[:110]}")
    print("  GPU (ms, calls):")
    for e in sorted(gpu, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"    {e.self_device_time_total / 1e3:8.2f} {e.count:6d}  {e.key[:110]}")


if __name__ == "__main__":
    main()
