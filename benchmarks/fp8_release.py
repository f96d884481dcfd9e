"""Release size on one GPU: one denoising step's velocity with FP8 experts against bf16, on the same
dummy weights, plus the FP8 model's memory and step time.

    python benchmarks/fp8_release.py --layers 32 --out results/

The bf16 model (150 GiB of weights) does not fit one H200, so the bf16 pass runs on the FP8
model's own non-expert weights (dummy init draws them identically with and without FP8; the FP8
qkv_proj / up_gate_proj are swapped for their bf16 draws during that pass) and, right before
each MoE layer runs, redraws that layer's bf16 experts into one shared buffer from the generator
state dummy init drew them with (init_dummy_weights' order, replayed here and checked: the FP8
experts must be exactly the quantized redraw). Both passes run prefill + one step
of both guidance branches, 1024², 'a cup of coffee on the table'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch import nn

from epdiff.distributed.parallel_state import ParallelState
from epdiff.layers.linear import ColumnParallelLinear
from epdiff.layers.norm import RMSNorm
from epdiff.models.hunyuan_image3.loading import load_model
from epdiff.models.hunyuan_image3.resolution import snap
from epdiff.models.hunyuan_image3.tokenizer import HunyuanTokenizer
from epdiff.moe.experts import GroupedExperts
from epdiff.moe.layer import moe_layers
from epdiff.quantization import fp8
from epdiff.quantization.fp8_method import Fp8LinearMethod
from step_scaling import release_width_model

STD = 0.02  # init_dummy_weights' default


def expert_draw_states(model, seed: int = 0) -> dict[int, torch.Tensor]:
    """Generator state before each FP8 module's draw (GroupedExperts, ColumnParallelLinear),
    replaying init_dummy_weights (same module order, same draw sizes: a draw advances the
    generator by its size alone)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    states = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                states[id(module)] = g.get_state()
                for kind in ("up_gate_proj", "down_proj"):
                    torch.empty(getattr(module, kind).shape, dtype=module.dtype, device=model.device).normal_(
                        0.0, STD, generator=g)
                continue
            if isinstance(module, ColumnParallelLinear) and isinstance(module.quant_method, Fp8LinearMethod):
                # drawn in the model dtype, quantized
                states[id(module)] = g.get_state()
                torch.empty(module.weight.shape, dtype=module.dtype, device=model.device).normal_(
                    0.0, STD, generator=g)
                continue
            is_norm = isinstance(module, (RMSNorm, nn.GroupNorm))
            for _, p in module.named_parameters(recurse=False):
                if not is_norm and p.dim() > 1:
                    torch.empty_like(p).normal_(0.0, STD, generator=g)
    return states


def redraw(shared: GroupedExperts, state: torch.Tensor, g: torch.Generator):
    g.set_state(state)
    with torch.no_grad():
        shared.up_gate_proj.normal_(0.0, STD, generator=g)
        shared.down_proj.normal_(0.0, STD, generator=g)


def inputs(model_dir: str, prompt: str, device, channels: int):
    tok = HunyuanTokenizer.from_pretrained(model_dir)
    base = 1024
    idx, h, w = snap(base, base, base)
    ids = tok.encode(prompt)
    seqs = [tok.build_sequence(ids, idx, h // 16, w // 16, base), tok.build_uncond_sequence(ids, idx, h // 16, w // 16, base)]
    seq, ts = seqs[0], seqs[0].timestep_index
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, channels, h // 16, w // 16, generator=g).to(device, torch.bfloat16)
    return (torch.stack([s.input_ids[:ts] for s in seqs]), seq.positions[:ts], latents,
            torch.tensor([750.0, 750.0], device=device), seq.positions[ts: seq.image_start + seq.image_len].to(device))


def step(model, prefix_ids, prefix_positions, latents, t, positions, steps=1):
    with torch.inference_mode():
        caches = model.prefill(prefix_ids, prefix_positions)
        times, v = [], None
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            v = model(latents, t, positions, caches)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return v.float(), times


def profile_kinds(model, data) -> dict[str, float]:
    """Kernel milliseconds of one FP8 step by kind (profile_step.py's grouping)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    from profile_step import kind_of

    prefix_ids, prefix_positions, latents, t, positions = data
    with torch.inference_mode():
        caches = model.prefill(prefix_ids, prefix_positions)
        model(latents, t, positions, caches)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(latents, t, positions, caches)
            torch.cuda.synchronize()
    by_kind = collections.Counter()
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA and us:
            by_kind[kind_of(event.key)] += us / 1e3
    return dict(by_kind.most_common())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="FP8 steps timed (the first is warm-up)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the script (use few --layers)")
    args = p.parse_args()
    device = torch.device(args.device)
    model_dir = release_width_model(args.layers)
    t0 = time.perf_counter()
    model, _ = load_model(model_dir, ParallelState.single(device), torch.bfloat16, device, load_format="dummy",
                          quantization="fp8")
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_weights = sum(p.numel() * p.element_size() for m in moe_layers(model) for p in m.experts.parameters())
    after_load = torch.cuda.max_memory_allocated(device)
    data = inputs(model_dir, "a cup of coffee on the table", device, model.config.latent_channels)
    torch.cuda.reset_peak_memory_stats(device)
    v8, times = step(model, *data, steps=args.steps)
    step_peak = torch.cuda.max_memory_allocated(device)
    by_kind = profile_kinds(model, data) if device.type == "cuda" else {}
    for layer in moe_layers(model):
        layer.reset_routing_stats()
    step(model, *data)
    load = torch.stack([layer.expert_load for layer in moe_layers(model)]).float()
    balance = (load.amax(-1) / load.mean(-1)).max().item()

    # The bf16 pass: one shared buffer of bf16 experts, redrawn before each MoE layer.
    states = expert_draw_states(model)
    first = moe_layers(model)[0]
    shared = GroupedExperts(first.experts.num_local_experts, first.experts.hidden_size,
                            first.experts.intermediate_size, torch.bfloat16, device, num_experts=first.num_experts)
    g = torch.Generator(device=device)
    for layer in (moe_layers(model)[0], moe_layers(model)[-1]):  # the replay reproduces the FP8 experts
        redraw(shared, states[id(layer.experts)], g)
        q, s = fp8.quantize_weight(shared.down_proj.detach()[5])
        assert torch.equal(q.float(), layer.experts.down_proj[5].float()) and \
            torch.equal(s, layer.experts.down_proj_scale[5]), \
            "replaying init_dummy_weights did not reproduce the FP8 experts"
    bf16_linears = {}
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear) and isinstance(module.quant_method, Fp8LinearMethod):
            g.set_state(states[id(module)])
            w = torch.empty(module.weight.shape, dtype=module.dtype, device=device).normal_(0.0, STD, generator=g)
            q, s = fp8.quantize_weight(w)
            assert torch.equal(q.float(), module.weight.float()) and torch.equal(s, module.weight_scale), \
                "replaying init_dummy_weights did not reproduce an FP8 projection"
            bf16_linears[module] = w
    for module, w in bf16_linears.items():  # an instance attribute shadows the class's forward
        module.forward = lambda x, w=w, b=module.bias: torch.nn.functional.linear(x, w, b)
    own = {}

    def swap_in(module, _args):
        own[id(module)] = module.experts
        redraw(shared, states[id(module.experts)], g)
        module.experts = shared

    def swap_out(module, _args, _out):
        module.experts = own.pop(id(module))

    hooks = [h for layer in moe_layers(model)
             for h in (layer.register_forward_pre_hook(swap_in), layer.register_forward_hook(swap_out))]
    v16, times16 = step(model, *data, steps=2)
    for h in hooks:
        h.remove()
    for module in bf16_linears:
        del module.forward

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    guided = lambda v: v[1] + args.guidance_scale * (v[0] - v[1])  # noqa: E731 (cond first, uncond second)
    res = dict(layers=args.layers, device=torch.cuda.get_device_name(device),
               weights_GB=weights / 1e9, expert_weights_GB=expert_weights / 1e9, load_s=load_s,
               peak_after_load_GiB=after_load / 2 ** 30, peak_during_steps_GiB=step_peak / 2 ** 30,
               fp8_step_s=statistics.mean(times[1:]), fp8_step_times=times, fp8_step_kernel_ms_by_kind=by_kind,
               bf16_redraw_step_s=times16[-1], routing_balance_max=balance,
               velocity_rel_err_cond=rel(v8[0], v16[0]), velocity_rel_err_uncond=rel(v8[1], v16[1]),
               velocity_rel_err=rel(v8, v16), guided_velocity_rel_err=rel(guided(v8), guided(v16)),
               cosine=float(torch.nn.functional.cosine_similarity(v8.flatten(), v16.flatten(), dim=0)))
    print(json.dumps(res, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_release.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
