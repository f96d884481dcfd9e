"""GPU: the FP8 expert path on Hopper (Triton gather+quantize and SwiGLU+quantize, chunked combine,
`torch._scaled_grouped_mm`) against the eager fallback, and a whole FP8 denoising step (and a
chunked expert forward) with no host sync."""

import pytest
import torch

from epdiff import kernels
from epdiff.quantization import fp8, get_quantization_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None,
                                                  reason="needs CUDA and Triton")]
FP8 = get_quantization_config("fp8")
HOPPER = torch.cuda.is_available() and fp8.scaled_grouped_mm_supported(torch.device("cuda"))


def same_codes(q, q_ref, s, s_ref):
    """Scales equal to fp32 rounding; codes equal but for a few neighbouring ones (the kernel
    multiplies by the reciprocal scale and Triton's float8 conversion rounds its own way: 0.05 to
    0.14 % of codes differed on an H200)."""
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    differ = (q.float() != q_ref.float()).float().mean().item()
    assert differ < 1e-2, differ
    # Where a code differs, it is the neighbouring one: 2^-3 apart for normal values, one
    # subnormal step (2^-9 of the scale unit) below them.
    step = 2.0 ** -3 * fp8.dequantize(q_ref, s_ref).abs() + 2.0 ** -9 * s_ref[:, None] * 1.001
    assert bool(((fp8.dequantize(q, s) - fp8.dequantize(q_ref, s_ref)).abs() <= step).all())


@torch.inference_mode()
def test_gather_quant_rows_matches_eager():
    from epdiff.kernels import moe as moe_kernels

    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16) * torch.logspace(-2, 2, 300, device="cuda")[:, None]
    rows = torch.randint(0, 300, (1000,), device="cuda")
    count = torch.tensor([777], dtype=torch.int32, device="cuda")
    q, s = moe_kernels.gather_quant_rows(x, rows, count)
    q_ref, s_ref = fp8.quantize_rows(x[rows[:777]])
    same_codes(q[:777], q_ref, s[:777], s_ref)


@torch.inference_mode()
def test_swiglu_quant_matches_eager():
    from epdiff.kernels import moe as moe_kernels

    fused = torch.randn(900, 2 * 3072, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(900, device="cuda")
    count = torch.tensor([640], dtype=torch.int32, device="cuda")
    q, s = moe_kernels.swiglu_quant(fused, w, count)
    up, gate = fused[:640].float().chunk(2, dim=-1)
    q_ref, s_ref = fp8.quantize_rows(up * torch.nn.functional.silu(gate) * w[:640, None])
    same_codes(q[:640], q_ref, s[:640], s_ref)


@torch.inference_mode()
def test_combine_in_chunks_equals_one_combine():
    from epdiff.kernels import moe as moe_kernels

    T, k, D = 500, 8, 1000
    valid = torch.rand(T * k, device="cuda") > 0.4
    n = int(valid.sum())
    slot_to_row = torch.full((T * k,), -1, dtype=torch.int64, device="cuda")
    slot_to_row[valid] = torch.randperm(n, device="cuda")
    token = torch.zeros(n + 50, dtype=torch.int64, device="cuda")
    token[slot_to_row[valid]] = torch.arange(T * k, device="cuda")[valid] // k
    y = torch.randn(n + 50, D, device="cuda", dtype=torch.bfloat16)  # rows past n: not pairs
    count = torch.tensor([n], dtype=torch.int32, device="cuda")
    whole = moe_kernels.combine(y[:n], slot_to_row, T, k)
    C = 700
    out = moe_kernels.combine(y[:C], slot_to_row, T, k)
    chunks = 1
    for lo in range(C, n + 50, C):
        moe_kernels.combine_add(out, y[lo:lo + C], lo, token, slot_to_row, count, k)
        chunks += 1
    picked = torch.where((slot_to_row >= 0)[:, None], y.float()[slot_to_row.clamp_min(0)], 0.0).view(T, k, D)
    ref, size = picked.sum(1), picked.abs().sum(1)
    # Each chunk rounds a token's running sum to bf16 once (8 significant bits, round to nearest):
    # at most 2^-8 of its size each time.
    for result, roundings in ((whole, 1), (out, chunks)):
        assert bool(((result.float() - ref).abs() <= roundings * 2.0 ** -8 * 1.01 * size + 1e-6).all())


def _experts(kernel, quant, E=8, D=512, I=256, num_experts=None):
    from epdiff.moe.experts import GroupedExperts

    g = torch.Generator(device="cuda").manual_seed(0)
    experts = GroupedExperts(E, D, I, torch.bfloat16, "cuda", kernel=kernel, num_experts=num_experts,
                             quant_config=quant)
    for e in range(E):
        experts.load_expert(e, "up_gate_proj", torch.randn(2 * I, D, device="cuda", generator=g) * 0.05)
        experts.load_expert(e, "down_proj", torch.randn(D, I, device="cuda", generator=g) * 0.05)
    return experts


@pytest.mark.skipif(not HOPPER, reason="needs torch._scaled_grouped_mm (Hopper)")
@torch.inference_mode()
def test_hopper_fp8_path_matches_fallback(monkeypatch):
    from epdiff.moe import experts as experts_module

    fused = _experts("auto", FP8)
    assert fused.uses_grouped_mm(torch.empty(1, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(333, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-1, 8, (333, 4), device="cuda")  # -1: the slot's expert is on another rank
    w = torch.rand(333, 4, device="cuda")
    y, counts = fused(x, ids, w)
    # The fallback: the same float8 weights, fp32 products on the CPU, per-expert loop.
    cpu = _experts("loop", FP8).to("cpu")
    cpu.load_state_dict({k: v.cpu() for k, v in fused.state_dict().items()})
    y_ref, counts_ref = cpu(x.cpu(), ids.cpu(), w.cpu())
    assert torch.equal(counts.cpu(), counts_ref)
    rel = (y.float().cpu() - y_ref.float()).norm() / y_ref.float().norm()
    # bf16 GEMM outputs (and the activation quantized from them) and fast accumulation against
    # fp32 throughout: measured 1.2 % on an H200; FP8 itself is ~6.6 % from bf16.
    assert rel < 3e-2, rel
    # Several chunks (as with EP) give the same result.
    monkeypatch.setattr(experts_module, "CHUNK_CAPACITY", 0.2)
    y_chunked, _ = fused(x, ids, w)
    torch.testing.assert_close(y_chunked.float(), y.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not HOPPER, reason="needs torch._scaled_grouped_mm (Hopper)")
@torch.inference_mode()
def test_chunked_experts_need_no_host_sync(monkeypatch):
    """An EP-like rank (8 of 32 experts, most slots elsewhere) in several chunks, bf16 and FP8."""
    from epdiff.moe import experts as experts_module

    monkeypatch.setattr(experts_module, "CHUNK_CAPACITY", 0.5)
    x = torch.randn(400, 512, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(-3, 8, (400, 4), device="cuda").clamp_min(-1)
    w = torch.rand(400, 4, device="cuda")
    for quant in (None, FP8):
        experts = _experts("auto", quant, num_experts=32)
        assert experts_module.expert_chunks(400, 4, 8, 32)[1] > 1
        experts(x, ids, w)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            experts(x, ids, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not HOPPER, reason="needs torch._scaled_grouped_mm (Hopper)")
def test_fp8_step_has_no_host_sync(tiny_model):
    from epdiff.distributed.parallel_state import ParallelState
    from epdiff.models.hunyuan_image3.loading import load_model
    from model_cases import PROMPTS, sequences, step_inputs

    # Widths multiple of 16: the FP8 grouped GEMM's alignment.
    model_dir = tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=128)
    device = torch.device("cuda")
    model, _ = load_model(model_dir, ParallelState.single(device), torch.bfloat16, device, quantization="fp8")
    assert model.model.layers["0"].mlp.experts.up_gate_proj.dtype == torch.float8_e4m3fn
    seqs = sequences(model_dir, PROMPTS[0])
    seq, ts = seqs[0], seqs[0].timestep_index
    latents, t = step_inputs(seq, 0, model.config.latent_channels)
    latents, t = latents.to(device).expand(2, -1, -1, -1), t.to(device).expand(2)
    positions = seq.positions[ts: seq.image_start + seq.image_len].to(device)
    with torch.inference_mode():
        caches = model.prefill(torch.stack([s.input_ids[:ts] for s in seqs]), seq.positions[:ts])
        first = model(latents, t, positions, caches)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            again = model(latents, t, positions, caches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert first.shape == again.shape and bool(torch.isfinite(again).all())
