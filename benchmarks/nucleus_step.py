"""One GPU's Nucleus-Image denoising step: epdiff's transformer against diffusers' own
(`NucleusMoEImageTransformer2DModel`, use_grouped_mm=True), the same random weights in both.

    python benchmarks/nucleus_step.py --layers 32 --out results/       # the release size: H200
    python benchmarks/nucleus_step.py --tiny --device cpu               # a smoke run of the script
    python benchmarks/nucleus_step.py --layers 24 --graphs              # and the step replayed as a CUDA graph

The release config (32 blocks, hidden 2048, 16 heads of 128 with 4 KV heads, 64 experts of width
1344 and a shared expert, capacity factors [0, 0, 0, 4, 4, 2, ...], the first three blocks and the
last dense), 1024x1024 (4,096 image tokens), guidance on, a text of --text-tokens tokens. A step is
what each pipeline runs per denoising step: diffusers' pipeline calls its transformer twice (the
conditional and the unconditional prompt, a batch of 1 each, projecting the text in every block
every time); epdiff runs both branches as one batch of 2 against text keys and values computed
once per request. epdiff in bf16 and with FP8 routed experts (quantized from the same weights).
Prints one JSON line per case and writes nucleus_step.json under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.nucleus_image.config import NucleusImageConfig
from epdiff.models.nucleus_image.model import NucleusImageTransformer
from epdiff.models.nucleus_image.weights import load_checkpoint
from epdiff.quantization import get_quantization_config
from epdiff.quantization.base import ExpertsMethod, UnquantizedExpertsMethod

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def release_config(layers: int) -> dict:
    factors = [0.0, 0.0, 0.0, 4.0, 4.0] + [2.0] * (layers - 5)
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=128,
                num_attention_heads=16, num_key_value_heads=4, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
                mlp_ratio=4.0, dense_moe_strategy="leave_first_three_and_last_block_dense", num_experts=64,
                moe_intermediate_dim=1344, capacity_factors=factors[:layers], route_scale=2.5, use_sigmoid=False)


def tiny_config(layers: int) -> dict:
    return dict(release_config(layers), attention_head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                joint_attention_dim=32, axes_dims_rope=(4, 6, 6), num_experts=8, moe_intermediate_dim=32)


class StateDictCheckpoint:
    """A loaded state dict seen as a checkpoint (SafetensorsCheckpoint's reading interface)."""

    class Slice:
        def __init__(self, name, tensor):
            self.name, self.tensor, self.file = name, tensor, "state_dict"

        def get_shape(self):
            return tuple(self.tensor.shape)

        def get_dtype(self):
            return DTYPE_NAMES[self.tensor.dtype]

        def __getitem__(self, index):
            return self.tensor[index]

        def full(self):
            return self.tensor

    def __init__(self, state_dict):
        self.state_dict, self.model_dir = state_dict, "state_dict"
        self.weight_map = {name: "state_dict" for name in state_dict}

    def names(self):
        return sorted(self.state_dict)

    def __contains__(self, name):
        return name in self.state_dict

    def get(self, name):
        return self.Slice(name, self.state_dict[name])


def timed(fn, iters: int, device) -> list[float]:
    times = []
    for _ in range(iters + 2):  # two warm-up calls
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times[2:]


def graphed_step(name, model, cache, latents, sigma, grid, iters, device, report, profile):
    """The same step captured once as a CUDA graph (kernels/graphs.CudaGraphStep) and replayed: its
    time, and its output against the eager step's."""
    from epdiff.kernels.graphs import CudaGraphStep

    graph = CudaGraphStep(lambda x, s: model(x, s, grid, cache))
    with torch.inference_mode():
        eager = model(latents, sigma, grid, cache).float()
        try:
            for _ in range(2):  # the eager warm-up, then the capture
                out = graph(latents, sigma)
        except RuntimeError as e:
            print(json.dumps(dict(case=name + " graph", error=str(e).splitlines()[0])), flush=True)
            return
        err = float((out.float() - eager).norm() / eager.norm())
        again = model(latents, sigma, grid, cache).float()  # eager twice: what the hardware alone varies
        noise = float((again - eager).norm() / eager.norm())
    step = torch.inference_mode()(lambda: graph(latents, sigma))
    times = timed(step, iters, device)
    profile(name + " graph", step)
    report(name + " graph", times, {"rel_err_vs_eager": err, "rel_err_eager_vs_eager": noise})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (a smoke run on CPU)")
    parser.add_argument("--skip-fp8", action="store_true")
    parser.add_argument("--graphs", action="store_true", help="also each epdiff step captured as a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="also epdiff's blocks under torch.compile (inductor's fusions; a data point, not the engine's path)")
    parser.add_argument("--grouped-gemms", action="store_true",
                        help="the routed experts' equal groups through the grouped GEMM, not the batched one (an A/B)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="print each case's top kernels (one step, torch.profiler, after its timing): compare "
                             "timings from runs without it")
    args = parser.parse_args()
    from diffusers import NucleusMoEImageTransformer2DModel

    if args.grouped_gemms:
        UnquantizedExpertsMethod.equal_groups = ExpertsMethod.equal_groups

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fields = (tiny_config if args.tiny else release_config)(args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        reference = NucleusMoEImageTransformer2DModel(**fields, use_grouped_mm=device.type == "cuda").to(dtype)
        with torch.no_grad():
            for name, p in reference.named_parameters():  # the same weights go into epdiff's model below
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
                else:  # norms' weights 1, biases 0
                    p.fill_(1.0 if "norm" in name else 0.0)
    reference.eval()
    config = NucleusImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    config.check()
    grid = (args.size // 16, args.size // 16)
    S, B = grid[0] * grid[1], 2
    latents = torch.randn(B, S, config.in_channels, device=device, dtype=dtype)
    text = torch.randn(B, args.text_tokens, config.joint_attention_dim, device=device, dtype=dtype)
    sigma = torch.full((B,), 0.7, device=device)
    results = []

    def report(case, times, extra=None):
        row = dict(case=case, layers=args.layers, size=args.size, step_s=statistics.mean(times),
                   step_s_std=statistics.pstdev(times), device=torch.cuda.get_device_name(device)
                   if device.type == "cuda" else "cpu", **(extra or {}))
        if device.type == "cuda":
            row["peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        results.append(row)
        print(json.dumps(row), flush=True)

    img_shapes = [(1, *grid)]

    @torch.inference_mode()
    def diffusers_step():
        for b in range(B):  # its pipeline: the conditional prompt, then the unconditional one
            reference(hidden_states=latents[b:b + 1], timestep=sigma[b:b + 1], encoder_hidden_states=text[b:b + 1],
                      img_shapes=img_shapes, return_dict=False)

    def profile(case, fn):
        if not args.profile:
            return
        from torch.profiler import ProfilerActivity
        with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"--- {case}: top kernels of one step")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=32, max_name_column_width=70))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    report("diffusers bf16" if dtype == torch.bfloat16 else "diffusers", timed(diffusers_step, args.iters, device))
    profile("diffusers", diffusers_step)
    state_dict = {k: v for k, v in reference.state_dict().items()}
    baseline = None
    for quantization in [None] + ([] if args.skip_fp8 else ["fp8"]):
        with torch.device(device):
            model = NucleusImageTransformer(config, ParallelState.single(device), dtype, device,
                                            get_quantization_config(quantization))
        load_checkpoint(model, StateDictCheckpoint(state_dict))
        model.eval()
        with torch.inference_mode():
            cache = model.encode_text(text, None, grid)  # once per request
            out = model(latents, sigma, grid, cache)
            if baseline is None:
                baseline = out.float()
                with torch.no_grad():
                    ref = torch.cat([reference(hidden_states=latents[b:b + 1], timestep=sigma[b:b + 1],
                                               encoder_hidden_states=text[b:b + 1], img_shapes=img_shapes,
                                               return_dict=False)[0] for b in range(B)]).float()
                err = float((out.float() - ref).norm() / ref.norm())
            else:
                err = float((out.float() - baseline).norm() / baseline.norm())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = torch.inference_mode()(lambda m=model, c=cache: m(latents, sigma, grid, c))  # as the engine runs it
        times = timed(step, args.iters, device)
        profile(f"epdiff {quantization}", step)
        name = f"epdiff {'bf16' if dtype == torch.bfloat16 else str(dtype)}" + (f" {quantization}" if quantization else "")
        report(name, times, {"rel_err_vs_" + ("diffusers" if quantization is None else "epdiff_bf16"): err})
        if args.graphs and device.type == "cuda":
            graphed_step(name, model, cache, latents, sigma, grid, args.iters, device, report, profile)
        if args.compile and device.type == "cuda":
            import time

            for block in model.transformer_blocks.values():
                block.forward = torch.compile(block.forward, dynamic=False)
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    model(latents, sigma, grid, cache)
                    torch.cuda.synchronize()
                compile_s = time.perf_counter() - start
                report(name + " compiled", timed(step, args.iters, device), {"compile_s": compile_s})
                if args.graphs:
                    graphed_step(name + " compiled", model, cache, latents, sigma, grid, args.iters, device, report,
                                 profile)
            except Exception as e:  # a data point: say what stopped it
                print(json.dumps(dict(case=name + " compiled", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")),
                      flush=True)
        del model, cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    speedups = {r["case"]: results[0]["step_s"] / r["step_s"] for r in results[1:]}
    print(json.dumps({"speedup_vs_diffusers": speedups}))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "nucleus_step.json"), "w") as f:
            json.dump({"results": results, "speedup_vs_diffusers": speedups}, f, indent=2)


if __name__ == "__main__":
    main()
