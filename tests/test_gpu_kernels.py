"""GPU: the Triton kernels (expert path, SwiGLU, norms, RoPE) against eager PyTorch."""

import pytest
import torch
import torch.nn.functional as F

from epdiff import kernels
from epdiff.kernels import moe as moe_kernels


def eager_swiglu(fused: torch.Tensor) -> torch.Tensor:
    up, gate = fused.float().chunk(2, dim=-1)
    return up * F.silu(gate)


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None,
                                                  reason="needs CUDA and Triton")]


@torch.inference_mode()
def test_swiglu_with_and_without_weight_matches_eager():
    fused = torch.randn(1000, 2 * 1500, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1000, device="cuda")
    expect = eager_swiglu(fused) * w[:, None]
    got = moe_kernels.swiglu(fused, w)
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(moe_kernels.swiglu(fused).float(), eager_swiglu(fused), rtol=1e-2, atol=1e-2)


@torch.inference_mode()
def test_combine_sums_each_tokens_slots():
    T, k, D = 300, 4, 1100
    rows = torch.randn(T * k, D, device="cuda", dtype=torch.bfloat16)
    slot_to_row = torch.randperm(T * k, device="cuda")
    slot_to_row[::3] = -1  # slots computed on another rank
    expect = torch.where((slot_to_row >= 0)[:, None], rows.float()[slot_to_row.clamp_min(0)], 0).view(T, k, D).sum(1)
    got = moe_kernels.combine(rows, slot_to_row, T, k)
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=2e-2)


@torch.inference_mode()
def test_count_limits_the_rows_written():
    x = torch.randn(50, 700, device="cuda", dtype=torch.bfloat16)
    rows = torch.randint(0, 50, (120,), device="cuda")
    count = torch.tensor([77], dtype=torch.int32, device="cuda")
    got = moe_kernels.gather_rows(x, rows, count)
    torch.testing.assert_close(got[:77], x[rows[:77]], rtol=0, atol=0)
    fused = torch.randn(120, 2 * 300, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(120, device="cuda")
    partial = moe_kernels.swiglu(fused, w, count)
    torch.testing.assert_close(partial[:77].float(), eager_swiglu(fused[:77]) * w[:77, None],
                               rtol=1e-2, atol=1e-2)


@torch.inference_mode()
def test_grouped_experts_need_no_host_sync():
    """The Hopper bf16 path sizes every buffer without reading a device value on the host."""
    from epdiff.moe.experts import GroupedExperts
    from epdiff.quantization.base import grouped_mm_supported

    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("needs Hopper grouped GEMMs")
    experts = GroupedExperts(4, 256, 128, torch.bfloat16, "cuda")
    torch.nn.init.normal_(experts.up_gate_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
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


@torch.inference_mode()
def test_rms_norm_with_and_without_residual_matches_eager():
    from epdiff.kernels import norm as norm_kernels
    from epdiff.layers.norm import RMSNorm

    norm = RMSNorm(4096, 1e-5, dtype=torch.bfloat16, device="cuda")
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    x = torch.randn(3, 77, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn_like(x)
    torch.testing.assert_close(norm_kernels.rms_norm(x, norm.weight, 1e-5), norm._eager(x), rtol=1.6e-2, atol=1e-2)
    out, total = norm_kernels.rms_norm(x, norm.weight, 1e-5, residual=r)
    assert torch.equal(total, x + r)  # the sum is rounded exactly as eager's add
    torch.testing.assert_close(out, norm._eager(x + r), rtol=1.6e-2, atol=1e-2)


@torch.inference_mode()
def test_rope_qk_norm_matches_eager():
    from epdiff.kernels import norm as norm_kernels
    from epdiff.layers.norm import RMSNorm
    from epdiff.models.hunyuan_image3.rotary import apply_rope, rope_2d

    B, S, kv, group, D = 2, 37, 4, 3, 128
    qkv = torch.randn(B, S, kv, group + 2, D, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 64, (S, 2), device="cuda")
    cos, sin = rope_2d(positions, D)
    q_norm, k_norm = (RMSNorm(D, 1e-5, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    torch.nn.init.normal_(q_norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(k_norm.weight, 1.0, 0.1)
    q, k = norm_kernels.rope_qk_norm(qkv, cos[None], sin[None], q_norm.weight, k_norm.weight, 1e-5)
    q_ref = q_norm._eager(apply_rope(qkv[:, :, :, :group].reshape(B, S, kv * group, D), cos[None], sin[None]))
    k_ref = k_norm._eager(apply_rope(qkv[:, :, :, group], cos[None], sin[None]))
    torch.testing.assert_close(q, q_ref, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(k, k_ref, rtol=1.6e-2, atol=1e-2)


@torch.inference_mode()
def test_swiglu_of_no_rows():
    """An expert that receives no token (the per-expert loop path) gets an empty activation."""
    from epdiff.layers.activation import swiglu_up_gate

    assert swiglu_up_gate(torch.empty(0, 64, device="cuda")).shape == (0, 32)


@pytest.mark.parametrize("shape", [(1, 128, 4, 96, 80), (2, 64, 1, 33, 17)])
@torch.inference_mode()
def test_group_norm_with_and_without_swish_matches_eager(shape):
    from epdiff.kernels import norm as norm_kernels

    x = torch.randn(shape, device="cuda") * 3 + 1.5
    w, b = torch.randn(shape[1], device="cuda"), torch.randn(shape[1], device="cuda")
    expect = F.group_norm(x, 32, w, b, 1e-6)
    torch.testing.assert_close(norm_kernels.group_norm(x, 32, w, b, 1e-6), expect, rtol=1e-5, atol=1e-5)
    got = norm_kernels.group_norm(x.half(), 32, w, b, 1e-6, True, torch.float16)
    swished = F.group_norm(x.half().float(), 32, w, b, 1e-6)
    torch.testing.assert_close(got.float(), swished * torch.sigmoid(swished), rtol=2e-3, atol=2e-3)


@torch.inference_mode()
def test_the_vae_decodes_with_the_group_norm_kernel_as_without(monkeypatch):
    """The release VAE at 256² under fp16 autocast, as the pipeline decodes: its image with the
    GroupNorm kernel against eager GroupNorm (uint8 levels)."""
    from epdiff.models.hunyuan_image3.vae import RELEASE_VAE_CONFIG, AutoencoderKLConv3D, to_uint8

    torch.manual_seed(0)
    vae = AutoencoderKLConv3D(dict(RELEASE_VAE_CONFIG), with_encoder=False).cuda().eval()
    latents = torch.randn(1, vae.latent_channels, 16, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        fused = to_uint8(vae.decode_latents(latents).float())
        monkeypatch.setattr(kernels, "ENABLED", False)
        eager = to_uint8(vae.decode_latents(latents).float())
    assert (fused.int() - eager.int()).abs().max() <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_nucleus_norm_rope_and_modulated_norm_match_eager(dtype):
    from epdiff.kernels import norm as norm_kernels
    from epdiff.layers.norm import RMSNorm
    from epdiff.models.nucleus_image.model import apply_rope, image_positions, layer_norm, rope_frequencies

    B, S, H, D, W = 2, 64, 16, 128, 2048
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    x = torch.randn(B, S, H, D, device="cuda", dtype=dtype)
    norm = RMSNorm(D, 1e-6, dtype=dtype, device="cuda")
    norm.weight.normal_()
    freqs = rope_frequencies((16, 56, 56), image_positions(8, 8)).cuda()
    got = norm_kernels.rms_norm_rope_pairs(x, norm.weight, torch.view_as_real(freqs), 1e-6)
    torch.testing.assert_close(got.float(), apply_rope(norm._eager(x), freqs).float(), **tol)

    x, update = (torch.randn(B, S, W, device="cuda", dtype=dtype) for _ in range(2))
    scale = (1 + torch.randn(B, 1, W, device="cuda")).to(dtype)
    gate = torch.randn(B, 1, W, device="cuda").clamp(-2, 2).tanh().to(dtype)
    out, total, normed = norm_kernels.modulated_layer_norm(x, scale[:, 0], 1e-6, update, gate[:, 0], True)
    summed = x + gate * update
    torch.testing.assert_close(total.float(), summed.float(), **tol)
    torch.testing.assert_close(normed.float(), layer_norm(summed).float(), **tol)
    # The statistics' summation order may move a norm by one ulp; the modulation after it is exact.
    torch.testing.assert_close(out, normed * scale, rtol=0, atol=0)
    plain, none, also_none = norm_kernels.modulated_layer_norm(x, scale[:, 0], 1e-6)
    _, _, plain_normed = norm_kernels.modulated_layer_norm(x, scale[:, 0], 1e-6, with_normed=True)
    torch.testing.assert_close(plain_normed.float(), layer_norm(x).float(), **tol)
    torch.testing.assert_close(plain, plain_normed * scale, rtol=0, atol=0)
    assert none is None and also_none is None


@torch.inference_mode()
def test_the_expert_choice_combine_by_token_matches_index_add_and_slots():
    from epdiff.moe.router import ExpertChoiceRouter
    from epdiff.distributed.parallel_state import ParallelState

    torch.manual_seed(0)
    B, S, E, D = 2, 256, 16, 512
    router = ExpertChoiceRouter(D, E, 2.0, ParallelState.single(torch.device("cuda")).sp, dtype=torch.bfloat16)
    router.to("cuda").weight.normal_()
    tokens, _ = router.expert_major(torch.randn(B, S, D, device="cuda", dtype=torch.bfloat16))
    rows = tokens.flatten()
    y = torch.randn(rows.numel(), D, device="cuda", dtype=torch.bfloat16)
    slot_to_row = torch.full((B * S * E,), -1, dtype=torch.int32, device="cuda")
    slot_to_row[rows * E + torch.arange(E, device="cuda").repeat_interleave(tokens.shape[1])] = torch.arange(
        rows.numel(), dtype=torch.int32, device="cuda")
    got = moe_kernels.combine_by_token(y, rows, B * S)
    expect = torch.zeros(B * S, D, device="cuda").index_add_(0, rows, y.float())
    torch.testing.assert_close(got.float(), expect, rtol=1e-2, atol=2e-2)
    assert torch.equal(got, moe_kernels.combine(y, slot_to_row, B * S, E))  # the same rows, the same order
    shared = torch.randn(B * S, D, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(moe_kernels.combine_by_token(y, rows, B * S, add=shared).float(),
                               expect + shared.float(), rtol=1e-2, atol=2e-2)


@torch.inference_mode()
def test_equal_expert_groups_by_batched_gemm_match_the_grouped_gemm():
    from epdiff.moe.experts import GroupedExperts
    from epdiff.quantization.base import ExpertsMethod

    torch.manual_seed(0)
    E, N, D, inter = 8, 96, 256, 192
    experts = GroupedExperts(E, D, inter, torch.bfloat16, "cuda")
    experts.up_gate_proj.normal_(0, D ** -0.5)
    experts.down_proj.normal_(0, inter ** -0.5)
    x = torch.randn(500, D, device="cuda", dtype=torch.bfloat16)
    token = torch.randint(0, 500, (E, N), device="cuda")
    weight = torch.rand(E, N, device="cuda")
    got, counts = experts.forward_by_expert(x, token, weight)
    expect = ExpertsMethod.equal_groups(experts.quant_method, experts, x, token.flatten(), weight.flatten(), N)
    assert counts.tolist() == [N] * E and got.shape == (E * N, D)
    torch.testing.assert_close(got.float(), expect.float(), rtol=2e-2, atol=2e-2)
