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


@torch.inference_mode()
def test_count_limits_the_rows_written():
    x = torch.randn(50, 700, device="cuda", dtype=torch.bfloat16)
    rows = torch.randint(0, 50, (120,), device="cuda")
    count = torch.tensor([77], dtype=torch.int32, device="cuda")
    got = kernels.gather_rows(x, rows, count)
    torch.testing.assert_close(got[:77], x[rows[:77]], rtol=0, atol=0)
    fused = torch.randn(120, 2 * 300, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(120, device="cuda")
    partial = kernels.swiglu_weight(fused, w, count)
    torch.testing.assert_close(partial[:77].float(), swiglu_up_gate(fused[:77].float()) * w[:77, None],
                               rtol=1e-2, atol=1e-2)


@torch.inference_mode()
def test_grouped_experts_need_no_host_sync():
    """The Hopper bf16 path sizes every buffer without reading a device value on the host."""
    from epdiff.moe.experts import GroupedExperts, grouped_mm_supported

    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("needs Hopper grouped GEMMs")
    experts = GroupedExperts(4, 256, 128, torch.bfloat16, "cuda")
    torch.nn.init.normal_(experts.w13, std=0.05)
    torch.nn.init.normal_(experts.w2, std=0.05)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-1, 4, (64, 2), device="cuda")  # -1: an expert on another rank
    w = torch.rand(64, 2, device="cuda")
    loop = GroupedExperts(4, 256, 128, torch.bfloat16, "cuda", kernel="loop")
    loop.load_state_dict(experts.state_dict())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, counts = experts(x, ids, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y_loop, counts_loop = loop(x, ids, w)
    assert torch.equal(counts, counts_loop)
    torch.testing.assert_close(y.float(), y_loop.float(), rtol=2e-2, atol=2e-2)
