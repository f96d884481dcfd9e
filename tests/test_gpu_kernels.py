"""GPU: the fused Triton element-wise kernels of the expert path against eager PyTorch."""

import pytest
import torch

from epdiff.layers.mlp import swiglu_up_gate
from epdiff.moe import kernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None,
                                                  reason="needs CUDA and Triton")]


@torch.inference_mode()
def test_swiglu_weight_matches_eager():
    fused = torch.randn(1000, 2 * 1500, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1000, device="cuda")
    expect = swiglu_up_gate(fused.float()) * w[:, None]
    got = kernels.swiglu_weight(fused, w)
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=1e-2)


@torch.inference_mode()
def test_combine_sums_each_tokens_slots():
    T, k, D = 300, 4, 1100
    rows = torch.randn(T * k, D, device="cuda", dtype=torch.bfloat16)
    slot_to_row = torch.randperm(T * k, device="cuda")
    slot_to_row[::3] = -1  # slots computed on another rank
    expect = torch.where((slot_to_row >= 0)[:, None], rows.float()[slot_to_row.clamp_min(0)], 0).view(T, k, D).sum(1)
    got = kernels.combine(rows, slot_to_row, T, k)
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=2e-2)
