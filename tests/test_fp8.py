"""FP8 experts on CPU: the numerics (quantize/dequantize, the fallback GEMMs), the expert module
(grouped chunked path = per-expert loop, near the fp64 reference), dummy and checkpoint loading,
the pre-quantized checkpoint writer and the errors for bad FP8 checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from epdiff.distributed.parallel_state import ParallelState
from epdiff.loader.safetensors_loader import CheckpointError
from epdiff.models.hunyuan_image3.loading import load_model
from epdiff.models.registry import get_family
from epdiff.moe import experts as experts_module
from epdiff.moe.dispatch import Dispatcher
from epdiff.moe.experts import GroupedExperts, expert_buffer_bytes, expert_chunks
from epdiff.quantization import Fp8Config, config_from_checkpoint, experts_method, get_quantization_config
from epdiff.quantization import fp8
from moe_cases import SMALL, make_tokens, make_weights, reference_moe

FP8 = get_quantization_config("fp8")
# e4m3 keeps 3 mantissa bits: a normal value is off by at most half an ulp, 2^-4 relative; below
# the smallest normal (2^-6 of the row's scale unit) the step is the subnormal one, 2^-9.
REL_ULP, SUBNORMAL_STEP = 2.0 ** -4, 2.0 ** -9


def rel(a, b):
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def test_quantize_dequantize_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 96, generator=g) * torch.logspace(-3, 2, 40)[None, :, None]  # channels of any scale
    w[1, 7] = 0.0  # an all-zero channel
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 40) and scale.dtype == torch.float32
    back = fp8.dequantize(q, scale)
    bound = REL_ULP * w.abs() + SUBNORMAL_STEP * scale[..., None] + 1e-12
    assert bool(((back - w).abs() <= bound).all())
    # The largest element of each channel lands on 448 exactly, so nothing saturates.
    assert torch.equal(q.float().abs().amax(-1)[w.abs().amax(-1) > 0], torch.full((119,), 448.0))
    assert torch.equal(back[1, 7], torch.zeros(96)) and bool(torch.isfinite(back).all())
    xq, xs = fp8.quantize_rows(w[0])
    assert torch.equal(xq.float(), q[0].float()) and torch.equal(xs, scale[0])


def test_fallback_gemms_against_fp32():
    g = torch.Generator().manual_seed(1)
    E, K, N, P = 4, 64, 48, 50
    a, w = torch.randn(P, K, generator=g), torch.randn(E, N, K, generator=g) * 0.05
    offs = torch.tensor([10, 10, 31, 44], dtype=torch.int32)  # expert 1 empty; rows 44.. belong to none
    aq, a_scale = fp8.quantize_rows(a)
    wq, w_scale = fp8.quantize_weight(w)
    out = fp8.scaled_grouped_mm_fallback(aq, a_scale, wq, w_scale, offs, torch.float32)
    bounds = [0] + offs.tolist()
    exact = torch.zeros(P, N)
    dequant = torch.zeros(P, N)
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        exact[lo:hi] = a[lo:hi] @ w[e].t()
        dequant[lo:hi] = fp8.dequantize(aq[lo:hi], a_scale[lo:hi]) @ fp8.dequantize(wq[e], w_scale[e]).t()
    assert torch.equal(out[44:], torch.zeros(P - 44, N))
    assert rel(out, dequant) < 1e-6  # the fallback is the product of the dequantized operands
    assert rel(out, exact) < 0.06  # two FP8 operands: a few per cent, as measured on the GPU
    dense = fp8.scaled_mm(aq[:10], a_scale[:10], wq[0], w_scale[0], torch.float32)
    assert torch.allclose(dense, out[:10], rtol=1e-6, atol=1e-6)


def make_experts(w, kernel, quant=FP8, num_experts=None):
    d = SMALL
    experts = GroupedExperts(d.experts, d.hidden, d.inter, kernel=kernel, num_experts=num_experts, quant_config=quant)
    for e in range(d.experts):
        for kind in ("up_gate_proj", "down_proj"):
            experts.load_expert(e, kind, w[f"experts.{e}.{kind}"])
    return experts


@torch.inference_mode()
def test_fp8_experts_grouped_chunks_equal_loop_and_stay_near_fp64(monkeypatch):
    w, common = make_weights(2, "skewed", False, 1)
    x = make_tokens(2, [37], "skewed", common)
    ref, _ = reference_moe(x, w, shared=False)
    gate = x @ w["gate.weight"].t()
    weights, ids = gate.softmax(-1).topk(SMALL.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    ids[::5, 1] = -1  # slots whose expert lives on another rank
    loop, _ = make_experts(w, "loop")(x, ids, weights)
    # Chunks of 128 pair rows: the 37×4 pairs run in two chunks, and the combine adds across them.
    monkeypatch.setattr(experts_module, "CHUNK_CAPACITY", 0.5)
    assert expert_chunks(37, SMALL.top_k, SMALL.experts, SMALL.experts) == (128, 2)
    grouped, counts = make_experts(w, "grouped_mm")(x, ids, weights)
    assert int(counts.sum()) == int((ids >= 0).sum())
    assert torch.allclose(grouped, loop, rtol=1e-5, atol=1e-6)
    full, _ = make_experts(w, "loop")(x, torch.where(ids >= 0, ids, gate.topk(SMALL.top_k).indices), weights)
    # Tokens sharing one strong direction (skewed routing) quantize a little worse than random ones.
    assert rel(full, ref) < 0.08
    # Pre-quantized rows (FP8 dispatch) give the very same result.
    rows = fp8.Fp8Rows(*fp8.quantize_rows(x), x.dtype)
    again, _ = make_experts(w, "grouped_mm")(rows, ids, weights)
    assert torch.equal(again, grouped)


@torch.inference_mode()
@pytest.mark.parametrize("kernel", ["loop", "grouped_mm"])
def test_the_moe_input_is_quantized_once_for_the_shared_and_routed_experts(monkeypatch, kernel):
    """One FP8 pass over the MoE input serves the shared expert and every routed pair (the rows
    then travel, or are gathered, as codes): the same numbers as quantizing each apart."""
    from fp8_cases import _fp8_layer
    w, common = make_weights(4, "skewed", True, 1)
    x = make_tokens(4, [23], "skewed", common)
    layer = _fp8_layer(ParallelState.single(torch.device("cpu")), w, kernel)
    quantized_rows = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda t: quantized_rows.append(tuple(t.shape)) or real(t))
    once = layer(x)
    assert quantized_rows.count((23, SMALL.hidden)) == 1
    assert not [s for s in quantized_rows if s[1] == SMALL.hidden and s != (23, SMALL.hidden)]
    # Quantizing the shared expert's input apart from the routed experts' gives the very same output.
    monkeypatch.setattr(layer, "shared_takes_prepared", False)
    assert torch.equal(layer(x), once)


def test_expert_buffers_stay_flat_as_ep_grows():
    """A rank gathers EP × T rows but computes ~T·k pairs: the chunk (what the grouped path
    allocates) stays at CHUNK_CAPACITY × T·k rows instead of growing with the EP × T·k pairs of
    the whole token group, so per-GPU memory falls with EP as the expert weights do."""
    tokens_per_rank, k, E = 4097, 8, 64
    for ep in (1, 2, 4, 8):
        rows, chunks = expert_chunks(ep * tokens_per_rank, k, E // ep, E)
        assert rows * chunks >= ep * tokens_per_rank * min(k, E // ep)  # the worst case always fits
        assert rows <= experts_module.CHUNK_CAPACITY * tokens_per_rank * k + experts_module.CHUNK_ALIGN
    assert expert_chunks(100, 8, 64, 64) == (800, 1)  # EP off: one chunk holding every pair
    method = experts_method(FP8)
    chunked = [expert_buffer_bytes(expert_chunks(ep * tokens_per_rank, k, E // ep, E)[0], 4096, 3072, method)
               for ep in (2, 4, 8)]
    every_pair = [expert_buffer_bytes(ep * tokens_per_rank * k, 4096, 3072, method) for ep in (2, 4, 8)]
    assert max(chunked) < 1.01 * min(chunked) and every_pair[2] > 5 * chunked[2]


def test_fp8_dispatch_moves_about_half_the_bytes():
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    ids, weights = torch.zeros(5, 8, dtype=torch.long), torch.rand(5, 8)
    per_row = {}
    for quant in (None, FP8):
        rows, row_values = experts_method(quant).pack_tokens(x)
        meta = Dispatcher._metadata(ids, weights, row_values)  # what travels with the rows
        per_row[quant] = rows[0].numel() * rows.element_size() + meta[0].numel() * meta.element_size()
    assert per_row[None] == 256 * 2 + 16 * 4 and per_row[FP8] == 256 + 17 * 4


def test_quantization_names_and_configs_are_checked():
    assert get_quantization_config(None) is None
    with pytest.raises(ValueError, match="quantization 'int4' is not supported"):
        get_quantization_config("int4")
    qc = FP8.checkpoint_config()
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic"
    assert Fp8Config.from_checkpoint_config(qc, "x") == FP8
    for bad, field in [({"quant_method": "awq"}, "quant_method"),
                       ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
                       ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size")]:
        with pytest.raises(ValueError, match=f"config.json: quantization_config.{field}"):
            config_from_checkpoint(bad, "m/config.json")


def write_quantized_checkpoint(model_dir, out_dir, quantization):
    return get_family("hunyuan_image3").quantize(model_dir, out_dir, quantization)


@pytest.fixture
def tiny(tiny_model):
    return tiny_model(image_base_size=128, seed=4)


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    tiny = tiny_model(image_base_size=128, seed=4)
    out = str(tmp_path_factory.mktemp("q") / "fp8")
    summary = write_quantized_checkpoint(tiny, out, "fp8")
    assert summary["quantized_tensors"] == 2 * 2 * 8  # layers × kinds × experts of make_tiny's default
    return out


def test_prequantized_checkpoint_loads_like_quantizing_on_read(tiny, quantized):
    with open(os.path.join(quantized, "config.json")) as f:
        assert json.load(f)["quantization_config"] == FP8.checkpoint_config()
    stored = load_file(os.path.join(quantized, index(quantized)["weight_map"][EXPERT_W13]))
    assert stored[EXPERT_W13].dtype == torch.float8_e4m3fn and stored[EXPERT_W13 + "_scale"].shape[1] == 1
    on_read, _ = load_model(tiny, ParallelState.single(), quantization="fp8")
    direct, _ = load_model(quantized, ParallelState.single())  # the checkpoint says fp8: no flag needed
    a, b = on_read.state_dict(), direct.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n].float(), b[n].float()) for n in a)
    assert direct.model.layers["0"].mlp.experts.up_gate_proj.dtype == torch.float8_e4m3fn
    plain, _ = load_model(tiny, ParallelState.single())
    assert plain.model.layers["0"].mlp.experts.up_gate_proj.dtype == torch.float32


def test_dummy_fp8_is_the_quantized_dummy(tiny):
    plain, _ = load_model(tiny, ParallelState.single(), load_format="dummy")
    q, _ = load_model(tiny, ParallelState.single(), load_format="dummy", quantization="fp8")
    qp = dict(q.named_parameters())
    fp8_names = {n for n, p in qp.items() if p.dtype == torch.float8_e4m3fn}
    # FP8: the routed experts and the column-parallel projections (qkv, the shared expert's up_gate).
    assert {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in fp8_names} == {"experts", "qkv_proj", "up_gate_proj"}
    for n, p in plain.named_parameters():
        if n not in fp8_names:
            assert torch.equal(p, qp[n]), n
        elif ".experts." not in n:
            w, s = fp8.quantize_weight(p.detach())
            assert torch.equal(qp[n].float(), w.float()) and torch.equal(qp[n + "_scale"], s), n
    experts, ref = q.model.layers["1"].mlp.experts, plain.model.layers["1"].mlp.experts
    w, s = fp8.quantize_weight(ref.down_proj.detach())
    assert torch.equal(experts.down_proj.float(), w.float()) and torch.equal(experts.down_proj_scale, s)


EXPERT_W13 = "model.layers.1.mlp.experts.3.gate_and_up_proj.weight"


def index(d):
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        return json.load(f)


def edit(d, name, value=None):
    """Replaces (value) or drops (None) one tensor of a checkpoint folder."""
    file = index(d)["weight_map"][name]
    tensors = load_file(os.path.join(d, file))
    if value is None:
        del tensors[name]
        listed = index(d)
        del listed["weight_map"][name]
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(listed, f)
    else:
        tensors[name] = value
    save_file(tensors, os.path.join(d, file))
    return file


@pytest.mark.parametrize("case, message", [
    ("missing scale", f"quantized tensor {EXPERT_W13} has no {EXPERT_W13}_scale"),
    ("scale shape", f"tensor {EXPERT_W13}_scale has shape \\(127, 1\\), expected \\(128, 1\\)"),
    ("weight shape", f"tensor {EXPERT_W13} has shape \\(128, 127\\), but config.json implies \\(128, 128\\)"),
    ("bf16 weight", f"tensor {EXPERT_W13} has dtype F32, but config.json's quantization_config says fp8"),
    ("fp8 dense", "tensor model.layers.0.self_attn.o_proj.weight is quantized \\(F8_E4M3\\), but only routed experts"),
    ("method", "quantization_config.quant_method 'gptq' is not supported"),
    ("zero scale", f"tensor {EXPERT_W13}: .*weight_scale has 1 entries that are not finite and positive \\(first: 0.0\\)"),
    ("bf16 scale", f"tensor {EXPERT_W13}_scale has dtype BF16, expected F32"),
    ("orphan scale", f"tensor {EXPERT_W13.replace('.3.', '.5.')}_scale scales {EXPERT_W13.replace('.3.', '.5.')}, which"),
])
def test_bad_fp8_checkpoints_are_refused(quantized, tmp_path, case, message):
    d = str(tmp_path / "bad")
    shutil.copytree(quantized, d)
    if case == "missing scale":
        edit(d, EXPERT_W13 + "_scale")
    elif case == "scale shape":
        edit(d, EXPERT_W13 + "_scale", torch.ones(127, 1))
    elif case == "weight shape":
        edit(d, EXPERT_W13, torch.zeros(128, 127).to(torch.float8_e4m3fn))
    elif case == "bf16 weight":
        edit(d, EXPERT_W13, torch.zeros(128, 128))
    elif case == "zero scale":
        edit(d, EXPERT_W13 + "_scale", torch.ones(128, 1).index_fill_(0, torch.tensor([5]), 0.0))
    elif case == "bf16 scale":
        edit(d, EXPERT_W13 + "_scale", torch.ones(128, 1, dtype=torch.bfloat16))
    elif case == "orphan scale":
        edit(d, EXPERT_W13.replace(".3.", ".5."))  # the weight goes, its scale stays
    elif case == "fp8 dense":
        name = "model.layers.0.self_attn.o_proj.weight"
        edit(d, name, load_file(os.path.join(d, index(d)["weight_map"][name]))[name].to(torch.float8_e4m3fn))
    else:
        with open(os.path.join(d, "config.json")) as f:
            raw = json.load(f)
        raw["quantization_config"]["quant_method"] = "gptq"
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(raw, f)
    with pytest.raises(CheckpointError, match=message):
        load_model(d, ParallelState.single())


def test_float8_tensors_need_a_quantization_config(tiny, quantized, tmp_path):
    d = str(tmp_path / "noconfig")
    shutil.copytree(quantized, d)
    with open(os.path.join(d, "config.json")) as f:
        raw = json.load(f)
    del raw["quantization_config"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(raw, f)
    with pytest.raises(CheckpointError, match="weight_scale is a quantized weight's scale, but config.json has no "
                                              "quantization_config|is quantized \\(F8_E4M3\\), but config.json has no "
                                              "quantization_config"):
        load_model(d, ParallelState.single())
    with pytest.raises(ValueError, match="already quantized"):
        write_quantized_checkpoint(quantized, str(tmp_path / "again"), "fp8")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_quantized_checkpoint(tiny, quantized, "fp8")


def test_quantize_command_writes_a_loadable_checkpoint(tiny, tmp_path, capsys):
    from epdiff.cli import main

    out = str(tmp_path / "cli")
    assert main(["quantize", tiny, out, "--quantization", "fp8"]) == 0
    assert "32 expert tensors in fp8" in capsys.readouterr().out
    model, _ = load_model(out, ParallelState.single())
    assert model.model.layers["1"].mlp.experts.down_proj_scale.shape == (8, 128)
    assert main(["quantize", tiny, out, "--quantization", "fp8"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
