"""How fast HunyuanImage-3.0-Instruct writes (its think and recaption passes) on one GPU: tokens per
second at batch 1 and batch 8, against the memory-bandwidth limit.

    python benchmarks/text_decode.py --layers 32 --quantization fp8 --batch 1 8 --tokens 256

Instruct-Distil at release width (hidden 4096, 64 experts top-8, vocab 133,120) cut to --layers,
dummy weights, a ~100-token prompt with the instruct template, greedy, the engine's own writing loop
(engine/write.py: prefill, then one token per row per step, each step's tokens to the host). The
budget is --tokens and nothing stops a row early (a random model writes the pass's end token with
odds of about 1 in 133,120 a token). The first run of each batch size is a warm-up.

The limit: a step reads every weight it uses once (attention, router, shared expert, the routed
experts its rows chose, the lm_head) and every row's K/V cache, at the GPU's HBM bandwidth (H200
4.8 TB/s, H100 SXM 3.35 TB/s). The experts a step chose are counted in a separate eager pass (a
hook on each router; the mean over layers and steps): with random weights the rows of a batch
choose alike, far fewer distinct experts than independent choices would (E·(1 − (1 − 8/E)^B)).
Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace

import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.write import write
from epdiff.kernels import graphs
from epdiff.models.base import TextSampling, TextTask
from epdiff.moe.router import Router
from epdiff.models.registry import model_info
from step_scaling import release_width_model

HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
PROMPT = ("A cozy reading corner by a tall window on a rainy afternoon: an armchair with a knitted blanket, a "
          "stack of old books, a cup of tea steaming on a small wooden table, a cat asleep on the cushion, warm "
          "lamp light against the grey street outside, drops running down the glass, plants on the sill, and a "
          "framed map of the coast on the wall behind.")


def distinct_experts(pipe, info, tasks, state) -> float:
    """The mean number of distinct experts a one-token step's router chose (an eager pass of 32
    tokens: a hook cannot run inside a CUDA graph)."""
    counts, hooks = [], []
    for module in pipe.transformer.modules():
        if isinstance(module, Router):
            hooks.append(module.register_forward_hook(
                lambda m, args, out: counts.append(out[0].unique().numel()) if out[0].shape[0] == len(tasks) else None))
    replay = graphs.CudaGraphStep.__call__
    graphs.CudaGraphStep.__call__ = lambda self, *inputs: self.fn(*inputs)
    try:
        write(pipe, info, [[(replace(task, sampling=TextSampling(32)), True) for task in tasks]], state)
    finally:
        graphs.CudaGraphStep.__call__ = replay
        for hook in hooks:
            hook.remove()
    return statistics.mean(counts)


def weight_bytes_per_step(config, rows: int, context: int, fp8: bool, experts: float) -> float:
    """Bytes a decode step of `rows` rows reads: the weights it uses (`experts` distinct routed
    experts a layer) and the K/V of `context` tokens a row."""
    D, hd, H, KV, E = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.num_experts
    column = 1 if fp8 else 2  # column-parallel projections and the routed experts are FP8 under --quantization fp8
    total = 2 * config.vocab_size * D  # lm_head, bf16
    for layer in range(config.num_hidden_layers):
        I = config.moe_intermediate_size[layer]
        S = config.shared_intermediate_size(layer)
        total += (column * D * (H + 2 * KV) * hd + 2 * H * hd * D  # qkv, o
                  + 4 * D * E  # router, fp32
                  + column * 2 * S * D + 2 * S * D  # shared expert: up and gate, down
                  + experts * 3 * I * D * column  # routed experts
                  + rows * context * 2 * KV * hd * 2)  # the K/V cache, bf16
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--variant", default="instruct-distil", choices=("instruct", "instruct-distil"))
    p.add_argument("--quantization", default="fp8", choices=("fp8", "none"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=2, help="timed runs per batch size, after a warm-up")
    p.add_argument("--profile", action="store_true", help="print the kernels of one batch-1 pass")
    p.add_argument("--out", default=None)
    p.add_argument("--model", default=None, help="a checkpoint folder instead (a smoke run of the script on CPU)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    info = model_info(args.model or release_width_model(args.layers, args.variant))
    state = ParallelState.single(torch.device("cuda" if cuda else "cpu"))
    quantization = None if args.quantization == "none" else args.quantization
    start = time.perf_counter()
    pipe = info.load_pipeline(state, torch.bfloat16 if cuda else torch.float32,
                              "dummy" if args.model is None else "safetensors", quantization, False)
    load_s = time.perf_counter() - start
    system = info.resolve_system_prompt("dynamic", "recaption")
    prompt_tokens = len(info.tokenizer.encode(PROMPT))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # Timing the steps apart from the prefill: the pipeline's start_text is the prefill.
    prefill = []
    start_text = pipe.start_text

    def timed_start(tasks, steps):
        sync()
        t0 = time.perf_counter()
        batch = start_text(tasks, steps)
        sync()
        prefill.append(time.perf_counter() - t0)
        return batch

    pipe.start_text = timed_start
    device = torch.cuda.get_device_name() if cuda else "cpu"
    bandwidth = next((v for k, v in HBM_BYTES_PER_S.items() if k in device), None)
    results = []
    for rows in args.batch:
        tasks = [TextTask(PROMPT, seed, "recaption", False, TextSampling(args.tokens), system) for seed in range(rows)]
        times = []
        for run in range(args.runs + 1):
            sync()
            t0 = time.perf_counter()
            written = write(pipe, info, [[(task, True) for task in tasks]], state)[0]
            sync()
            if run:
                times.append(time.perf_counter() - t0 - prefill[-1])
        steps = max(len(ids) for ids in written)
        step_s = statistics.median(times) / steps
        experts = distinct_experts(pipe, info, tasks, state)
        context = len(info.tokenizer.encode(system)) + prompt_tokens + 16 + steps // 2
        limit_s = (weight_bytes_per_step(info.config, rows, context, quantization == "fp8", experts) / bandwidth
                   if bandwidth else None)
        row = dict(batch=rows, steps=steps, step_ms=step_s * 1e3, tokens_per_s=rows / step_s, distinct_experts=experts,
                   tokens_per_s_per_row=1 / step_s, prefill_s=prefill[-1],
                   limit_step_ms=None if limit_s is None else limit_s * 1e3,
                   of_limit=None if limit_s is None else limit_s / step_s)
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.profile and cuda:
        from torch.profiler import ProfilerActivity, profile

        task = TextTask(PROMPT, 0, "recaption", False, TextSampling(32), system)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            write(pipe, info, [[(task, True)]], state)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    result = dict(layers=args.layers, variant=args.variant, quantization=args.quantization, device=device,
                  load_s=load_s, prompt_tokens=prompt_tokens, tokens=args.tokens,
                  peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None, results=results)
    for r in results:
        limit = "" if r["limit_step_ms"] is None else (f" | limit {r['limit_step_ms']:.2f} ms "
                                                     f"({100 * r['of_limit']:.0f} % of it)")
        print(f"| batch {r['batch']} | {r['step_ms']:.2f} ms a step | {r['tokens_per_s']:.0f} tokens/s "
              f"({r['tokens_per_s_per_row']:.0f} a row){limit} | prefill {r['prefill_s']:.3f} s |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "text_decode.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
