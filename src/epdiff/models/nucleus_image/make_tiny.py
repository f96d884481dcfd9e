"""A small Nucleus-Image folder in exactly the release's diffusers layout, written by diffusers' and
transformers' own classes (`save_pretrained`): model_index.json, transformer/ (sharded, with an
index), vae/, text_encoder/, processor/ (the tokenizer and its chat template), scheduler/.

The tokenizer is a word-level one over a small English vocabulary (the release's is Qwen3's BPE,
which cannot be downloaded here); it has the chat template's special tokens, so the pipeline
formats prompts exactly as with the release's.
"""

from __future__ import annotations

import json
import os

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
WORDS = """a an the of on in at to and with is are be as by for from it its this that these those
you your image generation assistant follow user's user prompt literally pay careful attention spatial layout
objects object described left right top bottom centre center middle must appear match exact counts count
assign colors colours color colour correct small large big tiny red green blue yellow purple orange black
white pink brown grey gray circle square triangle star cat dog holding sign says hello world photo of
picture painting system assistant""".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["[UNK]"])}
    for word in WORDS + list(".,:;!?'\"-"):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", additional_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny(out_dir: str, hidden_size: int = 64, num_layers: int = 6, num_attention_heads: int = 4,
              num_key_value_heads: int = 2, num_experts: int = 8, moe_intermediate_dim: int = 32,
              capacity_factors: list[float] | None = None, text_hidden_size: int = 32, text_layers: int = 9,
              seed: int = 0, dense_moe_strategy: str = "leave_first_three_and_last_block_dense",
              route_scale: float = 2.5, use_sigmoid: bool = False) -> str:
    """Random weights of the given sizes; returns out_dir. capacity_factors: one per layer
    (default: 0 for the dense layers, then 4, 4, 2, 2, ... as the release)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, NucleusMoEImageTransformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = hidden_size // num_attention_heads
    if capacity_factors is None:
        from diffusers.models.transformers.transformer_nucleusmoe_image import _is_moe_layer

        moe = [i for i in range(num_layers) if _is_moe_layer(dense_moe_strategy, i, num_layers)]
        capacity_factors = [0.0] * num_layers
        for k, i in enumerate(moe):
            capacity_factors[i] = 4.0 if k < 2 else 2.0
    rope_axes = [head_dim // 4 // 2 * 2, 0, 0]
    rope_axes[1] = rope_axes[2] = (head_dim - rope_axes[0]) // 2
    transformer = NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        joint_attention_dim=text_hidden_size, axes_dims_rope=tuple(rope_axes), mlp_ratio=4.0,
        dense_moe_strategy=dense_moe_strategy, num_experts=num_experts, moe_intermediate_dim=moe_intermediate_dim,
        capacity_factors=capacity_factors, use_sigmoid=use_sigmoid, route_scale=route_scale, use_grouped_mm=True)
    with torch.no_grad():  # diffusers leaves the experts' packed weights uninitialised (empty)
        for name, p in transformer.named_parameters():
            if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3:
                p.normal_(0.0, p.shape[1] ** -0.5)
    # Two 2x spatial downsamplings and one temporal, as the release's [1, 2, 4, 4] / [F, T, T] has three
    # and two: here [1, 2, 2] and [False, True] keep the factor 8 at a tenth of the width.
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    tokenizer = tiny_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text_config = dict(vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=text_hidden_size // 4, max_position_embeddings=2048,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [1, 1, 2], "mrope_interleaved": True},
                       pad_token_id=ids("<|endoftext|>"))
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_hidden_size,
                         num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=2)
    config = Qwen3VLConfig(text_config=text_config, vision_config=vision_config,
                           image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                           vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)

    os.makedirs(out_dir, exist_ok=True)
    transformer.save_pretrained(os.path.join(out_dir, "transformer"), max_shard_size="200KB")
    vae.save_pretrained(os.path.join(out_dir, "vae"))
    text_encoder.save_pretrained(os.path.join(out_dir, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(out_dir, "processor"))
    scheduler.save_pretrained(os.path.join(out_dir, "scheduler"))
    import diffusers

    index = {"_class_name": "NucleusMoEImagePipeline", "_diffusers_version": diffusers.__version__,
             "processor": ["transformers", "Qwen3VLProcessor"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
             "transformer": ["diffusers", "NucleusMoEImageTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKLQwenImage"]}
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out_dir
