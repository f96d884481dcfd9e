"""`epdiff make-tiny`: a small HunyuanImage-3.0 in exactly the release format.

config.json with the release's keys, generation_config.json, model.safetensors.index.json over
several shards (transformer in bf16 like the release, router and VAE in fp32), tokenizer.json
with every special token and tokenizer_config.json naming its bos/eos/pad tokens, and the VAE
weights under `vae.`.

Variants (`--variant`): `base` (HunyuanImage-3.0), `instruct` (HunyuanImage-3.0-Instruct: the
instruct template, a system prompt, the SigLIP2 vision tower `vision_model.*` and its aligner
`vision_aligner.*` with their configs) and `instruct-distil` (also cfg_distilled and use_meanflow:
`guidance_emb.*`, `timestep_r_emb.*`, 8 steps). The Instruct variants carry a `system_prompt.py`
whose prompts are short stand-ins written here (the release ships its own).
"""

from __future__ import annotations

import json
import os

import torch

from ...distributed.parallel_state import ParallelState
from ...loader.dummy import init_dummy_weights
from ...loader.safetensors_loader import save_tensors
from .conditioning import VIT_RUNTIME_KEYS, VIT_TYPE, Aligner
from .config import GenerationConfig, HunyuanImage3Config
from .model import HunyuanImage3Transformer
from .resolution import INSTRUCT_EXTRA_BUCKETS
from .tiny_tokenizer import build_tiny_tokenizer
from .vae import RELEASE_VAE_CONFIG, AutoencoderKLConv3D, vae_config_tiny
from .weights import export_state_dict


def tiny_config(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, num_experts, moe_topk,
                moe_intermediate_size, image_base_size=256, patch_embed_hidden_dim=64, vocab_size=None,
                vae=None) -> dict:
    head_dim = hidden_size // num_attention_heads
    L = num_hidden_layers
    return {
        "architectures": ["HunyuanImage3ForCausalMM"], "model_type": "hunyuan_image_3_moe",
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": L,
        "num_attention_heads": num_attention_heads, "num_key_value_heads": num_key_value_heads,
        "attention_head_dim": head_dim, "intermediate_size": moe_intermediate_size,
        "moe_intermediate_size": [moe_intermediate_size] * L, "num_experts": num_experts,
        "moe_topk": [moe_topk] * L, "num_shared_expert": [1] * L, "use_mixed_mlp_moe": True,
        "moe_layer_num_skipped": 0, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
        "group_limited_greedy": False, "capacity_factor": 1.0, "moe_drop_tokens": False,
        "hidden_act": "silu", "norm_type": "hf_rms", "rms_norm_eps": 1e-5, "use_qk_norm": True,
        "attention_bias": False, "mlp_bias": False, "use_rotary_pos_emb": True,
        "rope_scaling": {"type": "custom", "factor": 1.0}, "rope_theta": 10000.0,
        "max_position_embeddings": 22800, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "img_proj_type": "unet", "patch_size": 1, "patch_embed_hidden_dim": patch_embed_hidden_dim,
        "image_base_size": image_base_size, "vae_downsample_factor": [16, 16],
        "vae": dict(RELEASE_VAE_CONFIG) if vae == "release" else (vae or vae_config_tiny()),
    }


VARIANTS = ("base", "instruct", "instruct-distil")
# The Instruct releases' vision settings, at small sizes (config.json vit, vit_processor, vit_aligner).
# Keys the reference's vision tower reads from the vit dict as attributes (its Config has no defaults).
VIT_RUNTIME_VALUES = dict(_attn_implementation="sdpa", output_attentions=False, output_hidden_states=False,
                          use_return_dict=True)
TINY_SYSTEM_PROMPTS = {"en_vanilla": "You draw the image the user describes.",
                       "en_recaption": "You rewrite the user's request as a detailed caption, then draw it.",
                       "en_think_recaption": "You think about the request, rewrite it as a caption, then draw it."}
TINY_UNIFIED_PROMPT = "You answer in text and images."


# SigLIP2 so400m-patch16-naflex's sizes (Google's checkpoint; the Instruct release's own vit dict
# was not seen), for release-size configs.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
              num_patches=256, max_num_patches=256)
TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, num_patches=64,
                max_num_patches=64)


def instruct_fields(variant: str, hidden_size: int, vit_sizes: dict = TINY_VIT) -> tuple[dict, dict]:
    """config.json and generation_config.json fields of an Instruct variant."""
    distil = variant == "instruct-distil"
    sizes = dict(vit_sizes)
    max_patches = sizes.pop("max_num_patches")
    vit = dict(**sizes, num_channels=3, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
               attention_dropout=0.0, **VIT_RUNTIME_VALUES)
    vit_hidden = vit["hidden_size"]
    processor = dict(do_resize=True, do_rescale=True, do_normalize=True, rescale_factor=1 / 255,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], patch_size=16,
                     max_num_patches=max_patches, resample=2)
    config = dict(vit_type=VIT_TYPE, vit=vit, vit_processor=processor, cfg_distilled=distil, use_meanflow=distil,
                  vit_aligner=dict(projector_type="mlp_gelu", input_dim=vit_hidden, n_embed=hidden_size, depth=2))
    # The text passes' sampling as the base release's generation_config.json has it.
    generation = dict(sequence_template="instruct", use_system_prompt="en_vanilla", bot_task="image",
                      diff_infer_steps=8 if distil else 50, diff_guidance_scale=2.5 if distil else 5.0,
                      do_sample=True, temperature=0.6, top_k=1024, top_p=0.95)
    return config, generation


def vision_tensors(cfg: dict, seed: int, std: float) -> dict[str, torch.Tensor]:
    """The SigLIP2 tower (transformers' own class, its names under `vision_model.`) and the
    aligner (`vision_aligner.layers.{0,2}`: Linear, GELU, Linear), random."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(seed + 2)
    fields = {k: v for k, v in cfg["vit"].items() if k not in VIT_RUNTIME_KEYS}
    tower = Siglip2VisionModel(Siglip2VisionConfig(**fields))
    a = cfg["vit_aligner"]
    aligner = Aligner(a["input_dim"], a["n_embed"], a["depth"])
    init_dummy_weights(aligner, seed=seed + 3, std=std)
    tensors = {f"vision_model.{n.removeprefix('vision_model.')}": t for n, t in tower.state_dict().items()}
    tensors.update({f"vision_aligner.{n}": t for n, t in aligner.state_dict().items()})
    return tensors


def write_system_prompts(out_dir: str) -> None:
    """A system_prompt.py laid out as the release's (the constants epdiff reads), with stand-in text."""
    lines = ['"""Stand-in system prompts of a tiny epdiff checkpoint (the release ships its own)."""', ""]
    for name, text in TINY_SYSTEM_PROMPTS.items():
        lines.append(f"t2i_system_prompt_{name} = {text!r}")
    lines.append("t2i_system_prompts = {" + ", ".join(f"{name!r}: [t2i_system_prompt_{name}]"
                                                      for name in TINY_SYSTEM_PROMPTS) + "}")
    lines.append(f"unified_system_prompt_en = {TINY_UNIFIED_PROMPT!r}")
    with open(os.path.join(out_dir, "system_prompt.py"), "w") as f:
        f.write("\n".join(lines) + "\n")


def write_sharded(tensors: dict[str, torch.Tensor], out_dir: str, num_shards: int):
    names = sorted(tensors)
    per = -(-len(names) // num_shards)
    weight_map, total = {}, 0
    for s in range(num_shards):
        part = names[s * per:(s + 1) * per]
        if not part:
            continue
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_tensors({n: tensors[n].contiguous() for n in part}, os.path.join(out_dir, file))
        for n in part:
            weight_map[n] = file
            total += tensors[n].numel() * tensors[n].element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def make_tiny(out_dir: str, hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
              num_experts=8, moe_topk=2, moe_intermediate_size=64, image_base_size=256, patch_embed_hidden_dim=64,
              seed=0, num_shards=3, std=0.02, vocab_size=None, vae=None, config_only=False,
              variant="base") -> str:
    """config_only: config, generation config and tokenizer, no weights (for --load-format dummy
    at sizes too large to write). variant: one of VARIANTS."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    os.makedirs(out_dir, exist_ok=True)
    build_tiny_tokenizer(out_dir, image_base_size,
                         extra_ratio_tokens=0 if variant == "base" else len(INSTRUCT_EXTRA_BUCKETS))
    from tokenizers import Tokenizer
    vocab_size = vocab_size or Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")).get_vocab_size()
    cfg = tiny_config(hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, num_experts, moe_topk,
                      moe_intermediate_size, image_base_size, patch_embed_hidden_dim, vocab_size, vae)
    generation = None
    if variant != "base":
        extra, generation = instruct_fields(variant, hidden_size, SO400M if vae == "release" else TINY_VIT)
        cfg.update(extra)
        write_system_prompts(out_dir)
    config = HunyuanImage3Config.from_dict(cfg)
    if config_only:
        _write_configs(out_dir, cfg, generation)
        return out_dir
    torch.manual_seed(seed)
    model = HunyuanImage3Transformer(config, ParallelState.single())
    init_dummy_weights(model, seed=seed, std=std)
    extra_tensors = vision_tensors(cfg, seed, std) if variant != "base" else {}
    save_release_format(out_dir, cfg, model, AutoencoderKLConv3D(cfg["vae"]), num_shards, seed, std, generation,
                        extra_tensors)
    return out_dir


def save_release_format(out_dir: str, cfg: dict, model, vae, num_shards: int = 3, seed: int = 0, std: float = 0.02,
                        generation: dict | None = None, extra_tensors: dict | None = None):
    """A single-process model and its VAE as the release lays them out: transformer bf16, router
    and VAE fp32, the text-only ln_f/lm_head included (random: text-to-image never reads them)."""
    tensors = {n: (t.float() if ".mlp.gate.wg." in n else t.to(torch.bfloat16))
               for n, t in export_state_dict(model).items()}
    g = torch.Generator().manual_seed(seed + 1)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    tensors["model.ln_f.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = (torch.randn(vocab, hidden, generator=g) * std).to(torch.bfloat16)
    tensors.update({f"vae.{n}": t.detach().float().cpu().contiguous() for n, t in vae.state_dict().items()})
    tensors.update({n: t.detach().to(torch.bfloat16) for n, t in (extra_tensors or {}).items()})
    write_sharded({n: t.detach().cpu() for n, t in tensors.items()}, out_dir, num_shards)
    _write_configs(out_dir, cfg, generation)


def _write_configs(out_dir: str, cfg: dict, generation: dict | None = None):
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({**GenerationConfig().to_dict(), **(generation or {})}, f, indent=2)
