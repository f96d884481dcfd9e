"""The Instruct parity cases: the tiny checkpoints and requests both Tencent's code
(scripts/reference_instruct.py) and tests/test_instruct.py run."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from epdiff.models.hunyuan_image3.make_tiny import make_tiny

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "hunyuan_instruct_reference.safetensors")
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
             moe_topk=2, moe_intermediate_size=32, image_base_size=256, patch_embed_hidden_dim=32)
CASES = {  # what scripts/reference_instruct.py ran Tencent's code on
    "distil": dict(variant="instruct-distil", steps=8, guidance=2.5, solver="euler", prompt="a red circle",
                   seed=1, size=256),
    "instruct": dict(variant="instruct", steps=6, guidance=5.0, solver="euler", prompt="a red circle", seed=2,
                     size=256),
    "distil-heun": dict(variant="instruct-distil", steps=4, guidance=2.5, solver="heun-2",
                        prompt="two blue squares", seed=3, size=256),
    # 720x1280 (H x W): one of the Instruct code's four extra buckets (<img_ratio_36>)
    "distil-16-9": dict(variant="instruct-distil", steps=2, guidance=2.5, solver="euler", prompt="a red circle",
                        seed=8, size=(720, 1280)),
    # edits: the input images by name (input_image), the output size given
    "edit-distil": dict(variant="instruct-distil", steps=4, guidance=2.5, solver="euler", prompt="make it blue",
                        seed=1, size=256, images=("red-square",)),
    "edit-instruct": dict(variant="instruct", steps=3, guidance=5.0, solver="euler", prompt="make it blue",
                          seed=4, size=256, images=("red-square",)),
    "edit-two": dict(variant="instruct-distil", steps=3, guidance=2.5, solver="euler",
                     prompt="put the circle on the square", seed=6, size=256, images=("red-square", "wide-circle")),
}


# The text pass (bot_task think_recaption / recaption: the "think" and "recaption" text the model
# writes before its image), greedy, 32 new tokens at most; what the reference generated is in
# TEXT_REFERENCE (scripts/reference_instruct.py --text). size: 256 (256x256) or "auto" (the model
# picks the ratio token). system: the folder's system prompt passed as the custom one. text_bias:
# lm_head rows rewritten so that the closing tokens come (make_checkpoint).
TEXT_REFERENCE = os.path.join(os.path.dirname(__file__), "data", "hunyuan_instruct_text_reference.safetensors")
TEXT = dict(solver="euler", max_new_tokens=32, do_sample=False)
TEXT_CASES = {
    "recaption": dict(variant="instruct-distil", bot_task="recaption", size=256, steps=2, guidance=2.5,
                      system="en_recaption", prompt="a red circle", seed=1, **TEXT),
    "think-recaption": dict(variant="instruct", bot_task="think_recaption", size=256, steps=2, guidance=5.0,
                            system="en_think_recaption", prompt="a red circle", seed=2, **TEXT),
    "think-recaption-auto": dict(variant="instruct-distil", bot_task="think_recaption", size="auto", steps=2,
                                 guidance=2.5, system="en_think_recaption", prompt="two blue squares", seed=3,
                                 **TEXT),
    "recaption-auto": dict(variant="instruct-distil", bot_task="recaption", size="auto", steps=2, guidance=2.5,
                           system="en_recaption", prompt="a small green star", seed=4, **TEXT),
    "edit-think": dict(variant="instruct-distil", bot_task="think_recaption", size="auto", steps=2, guidance=2.5,
                       system="en_think_recaption", prompt="make it blue", seed=5, images=("red-square",), **TEXT),
}


def input_image(name: str) -> Image.Image:
    """The edits' input images, drawn here (deterministic)."""
    if name == "red-square":
        pixels = np.full((256, 256, 3), 255, dtype=np.uint8)
        pixels[64:192, 64:192] = (220, 30, 30)
    elif name == "wide-circle":  # 320x192 (W x H): a bucket of its own, fewer ViT patches than slots
        y, x = np.mgrid[:192, :320]
        pixels = np.full((192, 320, 3), 240, dtype=np.uint8)
        pixels[(y - 96) ** 2 + (x - 160) ** 2 < 60 ** 2] = (30, 160, 40)
        pixels[:, :8] = (0, 0, 0)
    else:
        raise ValueError(name)
    return Image.fromarray(pixels)


def make_checkpoint(folder: str, variant: str, text_bias: dict[str, float] | None = None, **sizes) -> str:
    """make_tiny's checkpoint; text_bias {token: c} then rewrites lm_head.weight (random, bf16):
    row(token) += c * (mean of all rows), in fp32, rounded back to bf16, one token after another
    in the dict's order (the mean taken before any change), so that greedy decoding emits the
    token where its logit, raised by c * (h . mean row), wins. The shard holding lm_head.weight
    is written back with the same names, dtypes and shapes (the index json stays valid)."""
    folder = make_tiny(folder, **{**SIZES, **sizes}, variant=variant, seed=5)
    if text_bias:
        bias_lm_head(folder, text_bias)
    return folder


def bias_lm_head(folder: str, text_bias: dict[str, float]) -> None:
    import json

    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from epdiff.loader.safetensors_loader import save_tensors

    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shard = os.path.join(folder, json.load(f)["weight_map"]["lm_head.weight"])
    tensors = load_file(shard)
    vocab = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).get_vocab()
    weight = tensors["lm_head.weight"].float()
    mean = weight.mean(0)
    for token, c in text_bias.items():
        weight[vocab[token]] += c * mean
    tensors["lm_head.weight"] = weight.to(torch.bfloat16)
    save_tensors(tensors, shard)
