"""The routed experts' GEMMs when every expert has the same number of rows (expert choice:
Nucleus-Image), one GPU: torch's grouped GEMM with equal offsets against a batched GEMM
(`torch.bmm`, cuBLAS) over [E, N, K] views, bf16, and FP8's grouped GEMM beside them.

    python benchmarks/expert_choice_gemms.py [--rows 256 512] [--out results/]

Shapes: Nucleus-Image's release (64 experts, hidden 2048, expert width 1344: up+gate [2688, 2048],
down [2048, 1344]); N rows per expert = images · capacity (2 images at 1024²: 256 rows where the
capacity factor is 2, 512 where it is 4). Times: CUDA events, mean of --iters after warm-up;
TFLOP/s count 2·M·N·K.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from epdiff.quantization import fp8
from epdiff.quantization.base import grouped_mm
from moe_layer import cuda_time  # same folder: one timer for the benchmarks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[256, 512], help="rows per expert")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1344, help="one expert's intermediate width")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    E, D, I = args.experts, args.hidden, args.width
    torch.manual_seed(0)
    up_gate = torch.randn(E, 2 * I, D, device=device, dtype=torch.bfloat16) / D ** 0.5
    down = torch.randn(E, D, I, device=device, dtype=torch.bfloat16) / I ** 0.5
    ug_q, ug_s = fp8.quantize_rows(up_gate.flatten(0, 1))
    dn_q, dn_s = fp8.quantize_rows(down.flatten(0, 1))
    ug_q, ug_s, dn_q, dn_s = ug_q.view(E, 2 * I, D), ug_s.view(E, 2 * I), dn_q.view(E, D, I), dn_s.view(E, D)
    results = []
    for n in args.rows:
        offs = torch.arange(1, E + 1, dtype=torch.int32, device=device) * n
        for name, w in (("up_gate", up_gate), ("down", down)):
            K, N = w.shape[2], w.shape[1]
            x = torch.randn(E * n, K, device=device, dtype=torch.bfloat16)
            wt = w.transpose(-2, -1)
            grouped = grouped_mm(x, wt, offs)
            batched = torch.bmm(x.view(E, n, K), wt).flatten(0, 1)
            flops = 2 * E * n * N * K
            xq, xs = fp8.quantize_rows(x)
            wq, ws = (ug_q, ug_s) if name == "up_gate" else (dn_q, dn_s)
            row = dict(rows_per_expert=n, gemm=name, shape=[E, n, N, K],
                       max_abs_diff=float((grouped - batched).abs().max()))
            for case, fn in (("grouped_mm", lambda: grouped_mm(x, wt, offs)),
                             ("bmm", lambda: torch.bmm(x.view(E, n, K), wt)),
                             ("fp8 grouped", lambda: fp8.scaled_grouped_mm(xq, xs, wq, ws, offs, torch.bfloat16))):
                ms, sd = cuda_time(fn, args.iters)
                row[case] = dict(ms=round(ms, 4), sd=round(sd, 4), tflops=round(flops / ms / 1e9, 1))
            print(json.dumps(row))
            results.append(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "expert_choice_gemms.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)


if __name__ == "__main__":
    main()
