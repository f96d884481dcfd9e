"""Every config field the reference reads either behaves as there or is refused at load with one
line naming the field and its value (issue 11, §1)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models


import epdiff
from epdiff.config import ConfigError
from epdiff.distributed.parallel_state import ParallelState
from epdiff.layers.mlp import SwiGLUMLP
from epdiff.loader.dummy import init_dummy_weights
from epdiff.models.hunyuan_image3.config import GenerationConfig, HunyuanImage3Config, check_generation_config
from epdiff.models.hunyuan_image3.family import HunyuanImage3Family
from epdiff.models.hunyuan_image3.loading import load_model
from epdiff.models.hunyuan_image3.make_tiny import make_tiny, save_release_format, tiny_config
from epdiff.models.hunyuan_image3.model import HunyuanImage3Transformer
from epdiff.models.hunyuan_image3.rotary import rope_2d
from epdiff.models.hunyuan_image3.tokenizer import NUM_RATIO_TOKENS, HunyuanTokenizer
from epdiff.models.hunyuan_image3.vae import AutoencoderKLConv3D
from epdiff.models.hunyuan_image3.weights import export_state_dict
from epdiff.moe import MoELayer, Router, moe_layers

GENERATION_CONFIG = GenerationConfig().to_dict()

HIDDEN, LAYERS, EXPERTS = 64, 2, 8
BUILTIN_MODEL = os.path.join(os.path.dirname(epdiff.__file__), "assets", "tiny-hunyuan-image3")


def base_config(**overrides) -> dict:
    cfg = tiny_config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=EXPERTS, moe_topk=2, moe_intermediate_size=32, image_base_size=128,
                      patch_embed_hidden_dim=32, vocab_size=64)
    cfg.update(overrides)
    return cfg


def build(**overrides) -> HunyuanImage3Transformer:
    return HunyuanImage3Transformer(HunyuanImage3Config.from_dict(base_config(**overrides)), ParallelState.single())


def reference_gate_weights(logits: torch.Tensor, k: int, norm_topk_prob: bool, scaling: float,
                           n_group: int | None = None, topk_group: int | None = None) -> torch.Tensor:
    """The reference's topkgating combine weights per (token, expert), dense [T, E], in float64."""
    gates = logits.double().softmax(-1)
    if n_group:
        group_best = gates.view(gates.shape[0], n_group, -1).amax(-1)
        keep = torch.zeros_like(group_best).scatter_(1, group_best.topk(topk_group, -1).indices, 1.0)
        gates = gates * keep.repeat_interleave(gates.shape[1] // n_group, dim=1)
    top, idx = gates.topk(k, -1)
    chosen = torch.zeros_like(gates).scatter_(1, idx, 1.0)
    if norm_topk_prob and k > 1:
        return chosen * gates / (chosen * gates).sum(-1, keepdim=True)
    return chosen * gates * scaling


def dense_weights(router: Router, x: torch.Tensor) -> torch.Tensor:
    ids, w = router(x)
    return torch.zeros(x.shape[0], router.num_experts, dtype=torch.float64).scatter_(1, ids, w.double())


def routers(model) -> list[Router]:
    return [layer.mlp.gate for layer in model.model.layers.values() if isinstance(layer.mlp, MoELayer)]


# -- routing: norm_topk_prob, routed_scaling_factor, top-1 ------------------------------------------


@pytest.mark.parametrize("k, norm, scaling", [(1, True, 1.0), (1, True, 2.5), (2, True, 2.5), (2, False, 2.5),
                                              (3, False, 1.0)])
def test_router_weights_follow_the_reference_rule(k, norm, scaling):
    model = build(moe_topk=k, norm_topk_prob=norm, routed_scaling_factor=scaling)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(40, HIDDEN, generator=g)
    for router in routers(model):
        with torch.no_grad():
            router.weight.normal_(0, 0.5, generator=g)
        expect = reference_gate_weights(x.double() @ router.weight.double().t(), k, norm, scaling)
        torch.testing.assert_close(dense_weights(router, x), expect, rtol=1e-5, atol=1e-6)


def test_top1_router_gives_the_probability_not_one():
    model = build(moe_topk=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    router = routers(model)[0]
    with torch.no_grad():
        router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(16, HIDDEN)
    ids, w = router(x)
    probs = (x @ router.weight.t()).softmax(-1)
    torch.testing.assert_close(w[:, 0], probs.max(-1).values)
    assert (w < 0.999).any()  # renormalising would make every weight exactly 1


# -- group_limited_greedy ---------------------------------------------------------------------------


def test_group_limited_greedy_picks_only_from_the_best_groups():
    model = build(group_limited_greedy=True, n_group=4, topk_group=2, moe_topk=3)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, HIDDEN, generator=g)
    for router in routers(model):
        assert (router.num_groups, router.topk_groups) == (4, 2)
        with torch.no_grad():
            router.weight.normal_(0, 0.5, generator=g)
        logits = x.double() @ router.weight.double().t()
        torch.testing.assert_close(dense_weights(router, x), reference_gate_weights(logits, 3, True, 1.0, 4, 2),
                                   rtol=1e-5, atol=1e-6)
        ids, _ = router(x)
        groups_per_token = [len(set((row // (EXPERTS // 4)).tolist())) for row in ids]
        assert max(groups_per_token) <= 2


def test_group_limited_greedy_off_ignores_n_group():
    model = build(group_limited_greedy=False, n_group=4, topk_group=1)
    assert all(r.num_groups == 1 for r in routers(model))


@pytest.mark.parametrize("overrides, message", [
    (dict(group_limited_greedy=True, topk_group=1), "lacks the key 'n_group'"),
    (dict(group_limited_greedy=True, n_group=3, topk_group=1), "n_group 3 does not divide num_experts 8"),
    (dict(group_limited_greedy=True, n_group=4, topk_group=5), r"topk_group 5 must be in \[1, n_group 4\]"),
    (dict(group_limited_greedy=True, n_group=4, topk_group=1, moe_topk=3), "moe_topk 3 exceeds the 2 experts"),
])
def test_group_limited_greedy_bad_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        HunyuanImage3Config.from_dict(base_config(**overrides))


# -- fields epdiff does not implement: refused with the field and the value --------------------------


@pytest.mark.parametrize("name, value", [
    ("hidden_act", "gelu"), ("hidden_act", "relu"), ("norm_type", "fused"),
    ("norm_type", "torch_nn"), ("rope_type", "default"), ("img_proj_type", "mlp"), ("use_qk_norm", False),
    ("use_rotary_pos_emb", False), ("attention_bias", True), ("mlp_bias", True),
])
def test_unimplemented_values_are_refused(name, value):
    with pytest.raises(ConfigError, match=f"config.json: {name} {value!r} is not supported"):
        HunyuanImage3Config.from_dict(base_config(**{name: value}))


@pytest.mark.parametrize("name, value", [("norm_type", "rms"), ("norm_type", "hf_rms"), ("hidden_act", "silu"),
                                         ("moe_drop_tokens", False), ("moe_drop_tokens", True), ("rope_type", "2d")])
@torch.inference_mode()
def test_implemented_values_behave_as_the_reference_says(name, value):
    """Each implemented value is what the model computes: RMSNorm for both RMS norm types, SwiGLU
    with SiLU, every (token, expert) pair computed (nothing dropped), the 2-D RoPE tables."""
    model = build(**{name: value})
    init_dummy_weights(model, seed=2)
    layer = model.model.layers["0"]
    assert type(layer.input_layernorm).__name__ == "RMSNorm" and layer.input_layernorm.eps == 1e-5
    x = torch.randn(6, HIDDEN)
    shared = layer.mlp.shared_expert
    up, gate = (x @ shared.up_gate_proj.weight.t()).chunk(2, -1)
    torch.testing.assert_close(shared(x), (up * torch.nn.functional.silu(gate)) @ shared.down_proj.weight.t())
    positions = torch.stack([torch.arange(9), torch.arange(9).flip(0)], 1)
    cos, sin = model._rope(positions)
    torch.testing.assert_close((cos[0], sin[0]), rope_2d(positions, model.config.head_dim))
    ids = torch.arange(7)[None] % model.config.vocab_size
    model.prefill(ids, torch.arange(7)[:, None].expand(7, 2))
    assert all(int(m.expert_load.sum()) == 7 * m.gate.top_k for m in moe_layers(model))  # none dropped


def test_mean_flow_needs_distilled_guidance():
    with pytest.raises(ConfigError, match="config.json: use_meanflow True without cfg_distilled is not supported"):
        HunyuanImage3Config.from_dict(base_config(use_meanflow=True))
    c = HunyuanImage3Config.from_dict(base_config(use_meanflow=True, cfg_distilled=True))
    assert c.num_step_tokens == 3 and HunyuanImage3Config.from_dict(base_config(cfg_distilled=True)).num_step_tokens == 2


def test_absent_fields_mean_the_release_defaults():
    cfg = base_config()
    for name in ("hidden_act", "norm_type", "moe_drop_tokens", "rope_scaling", "routed_scaling_factor",
                 "group_limited_greedy", "moe_layer_num_skipped", "use_qk_norm", "attention_bias"):
        cfg.pop(name)
    c = HunyuanImage3Config.from_dict(cfg)
    assert c.routed_scaling_factor == 1.0 and c.moe_layer_num_skipped == 0 and not c.group_limited_greedy


@pytest.mark.parametrize("value", [{"type": "dynamic", "factor": 2.0}, {"type": "linear", "factor": 1.0}, None,
                                   "custom"])
def test_rope_scaling_other_than_custom_is_refused(value):
    with pytest.raises(ConfigError, match=r"config.json: rope_scaling .* is not supported"):
        HunyuanImage3Config.from_dict(base_config(rope_scaling=value))


@torch.inference_mode()
def test_rope_scaling_factor_is_unused_as_in_the_reference():
    """The reference reads only rope_scaling["type"] (build_2d_rope is never given the factor):
    the same weights give the same prefill whatever the factor."""
    outputs = []
    for factor in (1.0, 2.0):
        model = build(rope_scaling={"type": "custom", "factor": factor})
        init_dummy_weights(model, seed=5)
        ids = torch.arange(7)[None] % model.config.vocab_size
        caches = model.prefill(ids, torch.arange(7)[:, None].expand(7, 2))
        outputs.append(torch.cat([caches[-1].k, caches[-1].v]))
    assert torch.equal(outputs[0], outputs[1])


def test_per_layer_expert_counts_are_refused():
    with pytest.raises(ConfigError, match=r"num_experts \[8, 8\] per layer is not supported"):
        HunyuanImage3Config.from_dict(base_config(num_experts=[8, 8]))


def test_a_value_of_the_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match="config.json: hidden_size 'wide' is not a valid int"):
        HunyuanImage3Config.from_dict(base_config(hidden_size="wide"))
    with pytest.raises(ConfigError, match="config.json: moe_topk 'two' is not an integer"):
        HunyuanImage3Config.from_dict(base_config(moe_topk="two"))


# -- moe_layer_num_skipped and the dense MLP width -------------------------------------------------


def test_skipped_layers_are_dense_mlps_of_intermediate_size():
    model = build(moe_layer_num_skipped=1, intermediate_size=48)
    dense, moe = model.model.layers["0"].mlp, model.model.layers["1"].mlp
    assert isinstance(dense, SwiGLUMLP) and isinstance(moe, MoELayer)
    assert dense.up_gate_proj.weight.shape == (2 * 48, HIDDEN) and dense.down_proj.weight.shape == (HIDDEN, 48)
    assert moe.experts.down_proj.shape[-1] == 32  # the experts keep moe_intermediate_size
    assert [type(m).__name__ for m in moe_layers(model)] == ["MoELayer"]


def test_one_expert_means_a_dense_mlp_as_in_the_reference():
    model = build(num_experts=1, moe_topk=1, intermediate_size=40)
    assert all(isinstance(layer.mlp, SwiGLUMLP) for layer in model.model.layers.values())
    assert model.model.layers["0"].mlp.down_proj.weight.shape == (HIDDEN, 40)


def test_dense_layer_without_intermediate_size_is_refused():
    cfg = base_config(moe_layer_num_skipped=1)
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match=r"intermediate_size None cannot size the dense MLP of layer\(s\) \[0\]"):
        HunyuanImage3Config.from_dict(cfg)


def test_dense_layer_checkpoint_round_trip(tmp_path):
    """A checkpoint with a skipped (dense) layer is written and read with the release's names."""
    cfg = base_config(moe_layer_num_skipped=1, intermediate_size=48)
    model = HunyuanImage3Transformer(HunyuanImage3Config.from_dict(cfg), ParallelState.single())
    init_dummy_weights(model, seed=3)
    names = export_state_dict(model)
    assert names["model.layers.0.mlp.gate_and_up_proj.weight"].shape == (96, HIDDEN)
    assert not any(n.startswith("model.layers.0.mlp.experts.") for n in names)
    save_release_format(str(tmp_path), cfg, model, AutoencoderKLConv3D(cfg["vae"]), num_shards=2)
    loaded, _ = load_model(str(tmp_path), ParallelState.single())
    read_back = export_state_dict(loaded)
    assert set(read_back) == set(names)
    for name, written in names.items():
        stored = written if ".mlp.gate.wg." in name else written.to(torch.bfloat16)  # as the release stores it
        assert torch.equal(read_back[name], stored.float()), name


# -- generation_config.json ------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [("sequence_template", "chat"), ("bot_task", "paint")])
def test_generation_settings_epdiff_does_not_build_are_refused(name, value):
    with pytest.raises(ConfigError, match=f"generation_config.json: {name} {value!r} is not supported"):
        check_generation_config({**GENERATION_CONFIG, name: value})


def test_absent_or_null_generation_settings_mean_the_base_models():
    base = GenerationConfig()
    assert (base.diff_infer_steps, base.diff_guidance_scale, base.flow_shift) == (50, 5.0, 3.0)
    assert GenerationConfig.from_dict({}) == base
    assert GenerationConfig.from_dict(dict(GENERATION_CONFIG)) == base
    nulls = GenerationConfig.from_dict({"use_system_prompt": None, "bot_task": None, "temperature": 0.6})
    assert (nulls.diff_infer_steps, nulls.raw["temperature"]) == (50, 0.6)  # LM keys kept, unused


def test_reading_the_folder_refuses_its_generation_settings(tmp_path):
    make_tiny(str(tmp_path), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
              num_experts=4, moe_intermediate_size=16, image_base_size=128, patch_embed_hidden_dim=32,
              config_only=True)
    assert HunyuanImage3Family().read(str(tmp_path)).default_num_inference_steps == 50
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "sequence_template": "chat"}))
    with pytest.raises(ConfigError, match=r"generation_config\.json: sequence_template 'chat' is not supported"):
        HunyuanImage3Family().read(str(tmp_path))
    with pytest.raises(ConfigError, match=r"generation_config\.json: sequence_template 'chat' is not supported"):
        load_model(str(tmp_path), ParallelState.single(), load_format="dummy")
    path.write_text(json.dumps({**json.loads(path.read_text()), "sequence_template": "instruct",
                                "use_system_prompt": "en_vanilla"}))
    with pytest.raises(ConfigError, match=r"generation_config\.json: use_system_prompt 'en_vanilla': the named "
                                          r"prompts ship with the checkpoint, and .*system_prompt\.py is missing"):
        HunyuanImage3Family().read(str(tmp_path))


# -- special tokens from the tokenizer's own config ------------------------------------------------


def write_release_style_tokenizer(folder, drop: str | None = None, config: dict | None = None,
                                  tokens_map: dict | None = None):
    """A tokenizer that names its roles like the release (<|startoftext|>, ...), not <bos>."""
    tokens = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<pad>", "<boi>", "<eoi>", "<img>", "<cfg>", "<timestep>",
              "<img_size_128>", *(f"<img_ratio_{k}>" for k in range(NUM_RATIO_TOKENS)), "red", "circle"]
    tokens = [t for t in tokens if t != drop]
    raw = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if t.startswith("<")])
    raw.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    return {t: i for i, t in enumerate(tokens)}


def test_roles_come_from_tokenizer_config(tmp_path):
    ids = write_release_style_tokenizer(tmp_path, config={
        "bos_token": {"__type": "AddedToken", "content": "<|startoftext|>", "special": True},
        "eos_token": "<|endoftext|>", "pad_token": "<pad>"})
    tok = HunyuanTokenizer.from_pretrained(tmp_path)
    assert (tok.bos, tok.eos, tok.pad) == (ids["<|startoftext|>"], ids["<|endoftext|>"], ids["<pad>"])
    seq = tok.build_sequence(tok.encode("red circle"), 16, 1, 2, 128)
    assert seq.input_ids[0] == ids["<|startoftext|>"]


def test_special_tokens_map_entry_wins_and_eos_pad_may_be_absent(tmp_path):
    ids = write_release_style_tokenizer(tmp_path, config={"bos_token": "<pad>"},
                                        tokens_map={"bos_token": "<|startoftext|>"})
    tok = HunyuanTokenizer.from_pretrained(tmp_path)
    assert tok.bos == ids["<|startoftext|>"] and tok.eos is None and tok.pad is None


def test_tokenizer_without_config_names_the_missing_role(tmp_path):
    write_release_style_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match=r"no bos_token named in tokenizer_config\.json or special_tokens_map"):
        HunyuanTokenizer.from_pretrained(tmp_path)


def test_role_token_not_in_the_vocabulary_is_a_clear_error(tmp_path):
    write_release_style_tokenizer(tmp_path, config={"bos_token": "<s>"})
    with pytest.raises(ConfigError, match=r"tokenizer\.json: no token '<s>'"):
        HunyuanTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("token", ["<boi>", "<timestep>", "<img_ratio_5>"])
def test_missing_image_token_is_a_clear_error(tmp_path, token):
    write_release_style_tokenizer(tmp_path, drop=token, config={"bos_token": "<|startoftext|>"})
    with pytest.raises(ConfigError, match=f"tokenizer\\.json: no token '{token}'"):
        HunyuanTokenizer.from_pretrained(tmp_path)


def test_builtin_model_and_make_tiny_output_load(tmp_path):
    for folder in (BUILTIN_MODEL, make_tiny(str(tmp_path), config_only=True)):
        tok = HunyuanTokenizer.from_pretrained(folder)
        assert tok.bos == tok.token_id("<bos>")
        HunyuanImage3Config.from_pretrained(folder)


# -- RoPE inverse frequencies ----------------------------------------------------------------------


def test_rope_inverse_frequencies_use_the_reference_expression():
    d, theta = 128, 10000.0
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))  # the reference's build_2d_rope
    other = theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    assert not torch.equal(freqs, other)  # the two roundings differ, so this test can tell them apart
    p = 4099  # a text position: y = x = p
    cos, sin = rope_2d(torch.tensor([[p, p]]), d, theta)
    angles = torch.full((d // 2,), float(p)) * freqs
    assert torch.equal(cos[0], torch.cat([angles, angles]).cos())
    assert torch.equal(sin[0], torch.cat([angles, angles]).sin())
    assert math.isclose(float(freqs[1]), theta ** (-2 / d), rel_tol=1e-6)
