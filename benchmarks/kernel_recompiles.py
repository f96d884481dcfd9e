"""Seconds of the first call of each Triton row kernel at new row counts (prompt lengths).

    python benchmarks/kernel_recompiles.py

A kernel specialised on its row count would compile again for every new prompt length (about a
second each, on every rank, inside a server's request); the row kernels take their program
count at launch, so only the first call of all should pay the compile.
"""

import time

import torch

from epdiff.kernels import moe


def first_call_seconds(fn, rows_list):
    out = []
    for rows in rows_list:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(rows)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main():
    device = torch.device("cuda")
    width = 4096
    rows_list = [37, 51, 64, 77, 90, 101, 118, 230, 511, 1003]
    x = torch.randn(2048, 2 * width, device=device, dtype=torch.bfloat16)
    cases = {
        "swiglu": lambda r: moe.swiglu(x[:r]),
        "quantize_rows": lambda r: moe.quantize_rows(x[:r, :width]),
        "swiglu_quant": lambda r: moe.swiglu_quant(x[:r], torch.ones(r, device=device),
                                                   torch.tensor([r], device=device, dtype=torch.int32)),
    }
    for name, fn in cases.items():
        seconds = first_call_seconds(fn, rows_list)
        print(f"{name}: first call {seconds[0]:.3f} s (compile); next new row counts "
              + " ".join(f"{r}:{1e3 * s:.1f}ms" for r, s in zip(rows_list[1:], seconds[1:])))


if __name__ == "__main__":
    main()
