"""GPU: the MoE layer in bf16 over NCCL against one GPU (run on the device machine)."""

import json
import os

import pytest
import torch

from epdiff.distributed.launch import launch
from gpu_cases import bf16_equivalence
from layouts import layout

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_bf16_nccl_matches_single_gpu():
    layouts = [layout(tp=2), layout(sp=2), layout(cfg=2), layout(dp=2)]
    rows = launch(2, bf16_equivalence, layouts)
    for r in rows:
        print(f"{r['layout']:60s} {r['routing']:7s} |2 GPUs - 1 GPU|/max {r['vs_single']:.2e}  "
              f"vs fp64: 2 GPUs {r['parallel_vs_fp64']:.2e}, 1 GPU {r['single_vs_fp64']:.2e}")
    if os.environ.get("EPDIFF_RESULTS"):
        with open(os.path.join(os.environ["EPDIFF_RESULTS"], "moe_bf16_equivalence.json"), "w") as f:
            json.dump(rows, f, indent=1)
    for r in rows:
        # bf16 rounding of partial sums: the parallel result is as close to fp64 as one GPU's.
        assert r["vs_single"] < 2e-2, r
        assert r["parallel_vs_fp64"] < 2 * r["single_vs_fp64"] + 1e-2, r
