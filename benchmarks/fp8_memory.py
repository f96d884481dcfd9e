"""Per-GPU memory of HunyuanImage-3.0 by EP size, computed on the CPU: weights (bf16 or FP8
experts) and the expert path's transient buffers, chunked (now) against one buffer for every
(token, slot) pair of the token group (before), at 1024² with guidance (4,097 tokens per branch).

    python benchmarks/fp8_memory.py [--out results/]

Layouts: EP = 1 is one GPU with both branches (8,194 tokens); EP = n > 1 is CFG2 × DP(n/2)
(each GPU one branch of one prompt, 4,097 tokens; the all-gather hands every rank n × 4,097
rows). Weights per GPU = every non-expert weight (replicated) + the experts / EP. Parameter
counts come from the model's own modules (one release-width layer built on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.hunyuan_image3.config import HunyuanImage3Config
from epdiff.models.hunyuan_image3.model import HunyuanImage3Transformer
from epdiff.moe.experts import expert_buffer_bytes, expert_chunks
from epdiff.moe.layer import moe_layers
from epdiff.quantization import experts_method, get_quantization_config
from step_scaling import release_width_model

TOKENS_PER_BRANCH = 1 + 64 * 64  # <timestep> + a 1024² image's tokens


def parameter_bytes(layers: int, act_bytes: int = 2) -> dict:
    """Bytes of the non-expert weights (all layers) and of one layer's routed experts, bf16 and
    FP8 (with scales), from a one-layer model's modules."""
    one = HunyuanImage3Config.from_pretrained(release_width_model(1))
    with torch.device("cpu"):
        model = HunyuanImage3Transformer(one, ParallelState.single(), dtype=torch.bfloat16,
                                         quant_config=get_quantization_config("fp8"))
    experts = moe_layers(model)[0].experts
    layer = model.model.layers["0"]
    layer_rest = sum(p.numel() for n, p in layer.named_parameters() if ".experts." not in n) * act_bytes
    outside = sum(p.numel() for p in model.parameters()) * act_bytes - sum(
        p.numel() for p in layer.parameters()) * act_bytes
    fp8_experts = sum(p.numel() * p.element_size() for p in experts.parameters())
    bf16_experts = (experts.up_gate_proj.numel() + experts.down_proj.numel()) * act_bytes
    return dict(rest=outside + layers * layer_rest, experts_bf16=layers * bf16_experts,
                experts_fp8=layers * fp8_experts, num_experts=experts.num_local_experts,
                hidden=experts.hidden_size, inter=experts.intermediate_size, top_k=one.moe_topk[0])


def table(layers: int = 32):
    w = parameter_bytes(layers)
    E, k, D, I = w["num_experts"], w["top_k"], w["hidden"], w["inter"]
    rows = []
    for ep in (1, 2, 4, 8):
        gathered = 2 * TOKENS_PER_BRANCH if ep == 1 else ep * TOKENS_PER_BRANCH
        chunk_rows, chunks = expert_chunks(gathered, k, E // ep, E)
        for dtype in ("bf16", "fp8"):
            method = experts_method(get_quantization_config("fp8" if dtype == "fp8" else None))
            weights = w["rest"] + w[f"experts_{dtype}"] / ep
            before = expert_buffer_bytes(gathered * k, D, I, method)
            now = expert_buffer_bytes(chunk_rows, D, I, method)
            rows.append(dict(ep=ep, layout="1 GPU" if ep == 1 else f"CFG2×DP{ep // 2}", dtype=dtype,
                             gathered_rows=gathered, chunks=chunks, chunk_rows=chunk_rows,
                             weights_GiB=weights / 2 ** 30, buffers_before_GiB=before / 2 ** 30,
                             buffers_now_GiB=now / 2 ** 30, total_before_GiB=(weights + before) / 2 ** 30,
                             total_now_GiB=(weights + now) / 2 ** 30))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = table(args.layers)
    print("| EP | layout | experts | rows gathered | weights GiB | expert buffers before → now GiB (chunks) | "
          "weights + buffers before → now GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ep']} | {r['layout']} | {r['dtype']} | {r['gathered_rows']} | {r['weights_GiB']:.1f} | "
              f"{r['buffers_before_GiB']:.2f} → {r['buffers_now_GiB']:.2f} ({r['chunks']}) | "
              f"{r['total_before_GiB']:.1f} → {r['total_now_GiB']:.1f} |")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "fp8_memory.json"), "w") as f:
            json.dump(dict(layers=args.layers, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
