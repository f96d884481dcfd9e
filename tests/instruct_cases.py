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
# writes before its image), greedy, 32 new tokens at most; what the reference generated, the
# image pass's input ids and latents are in TEXT_REFERENCE (scripts/reference_instruct.py --text).
# size: 256 (256x256) or "auto" (the model picks the ratio token); system: the folder's system
# prompt passed as the custom one; text_bias: lm_head rows scaled (make_checkpoint) so that the
# random model writes </think> and </recaption> within the 32 tokens.
TEXT_REFERENCE = os.path.join(os.path.dirname(__file__), "data", "hunyuan_instruct_text_reference.safetensors")
TEXT = dict(solver="euler", steps=2, max_new_tokens=32, do_sample=False)
DISTIL, INSTRUCT = dict(variant="instruct-distil", guidance=2.5), dict(variant="instruct", guidance=5.0)
TEXT_CASES = {
    # </recaption> after 10 words (an <img_ratio_20> among them): end of the pass
    "recaption": dict(**DISTIL, bot_task="recaption", size=256, system="en_recaption", prompt="a small green star",
                      seed=1, text_bias={"</recaption>": 3.9}, **TEXT),
    # </think> after 7 tokens, <recaption> forced, </recaption> 2 tokens later; real CFG image pass
    "think-recaption": dict(**INSTRUCT, bot_task="think_recaption", size=256, system="en_think_recaption",
                            prompt="a red circle", seed=2, text_bias={"</think>": 1.85, "</recaption>": 4.0},
                            **TEXT),
    # </think>, <recaption> forced, </recaption>, then <answer> <boi> <img_size_256> forced and the
    # ratio token (greedy over the ratio tokens): <img_ratio_12>
    "think-recaption-auto": dict(**DISTIL, bot_task="think_recaption", size="auto", system="en_think_recaption",
                                 prompt="a small green star", seed=3,
                                 text_bias={"</think>": 2.78, "</recaption>": 5.0}, **TEXT),
    # </recaption> after 16 tokens, then the forced tokens and the ratio token
    "recaption-auto": dict(**DISTIL, bot_task="recaption", size="auto", system="en_recaption", prompt="two circles",
                           seed=4, text_bias={"</recaption>": 2.9}, **TEXT),
    # an edit: the input image in the text pass too (its VAE latents sampled with the text pass's own
    # seed, drawn by the reference from Python's random: TEXT_REFERENCE NAME.text_seed)
    "edit-think": dict(**DISTIL, bot_task="think_recaption", size="auto", system="en_think_recaption",
                       prompt="make the square blue", seed=5, images=("red-square",),
                       text_bias={"</think>": 2.3, "</recaption>": 4.0}, **TEXT),
    # no closing token within 32 tokens: the cot text is all 32 (real CFG image pass)
    "recaption-max-tokens": dict(**INSTRUCT, bot_task="recaption", size=256, system="en_recaption",
                                 prompt="a small green star", seed=6, **TEXT),
    # auto size: a ratio token the model writes by itself ends the pass (before any </recaption>)
    "recaption-auto-ratio-stop": dict(**DISTIL, bot_task="recaption", size="auto", system="en_recaption",
                                      prompt="a small green star", seed=7, **TEXT),
    # </think>, <recaption> forced, then </think> twice more and no </recaption> within 32 tokens
    "think-recaption-max-tokens": dict(**DISTIL, bot_task="think_recaption", size=256, system="en_think_recaption",
                                       prompt="two blue squares", seed=8, text_bias={"</think>": 2.2}, **TEXT),
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
    """make_tiny's checkpoint (seed 5). text_bias {token: factor} (TEXT_CASES): the lm_head.weight
    row of each named token multiplied by its factor afterwards, in fp32 from the stored bf16
    values, rounded back to bf16 (the logit of the token is scaled by the factor, so greedy
    decoding emits it at the first step where its scaled logit wins). Only the shard holding
    lm_head.weight is rewritten, with the same tensor names, dtypes and shapes, so the index
    json stays valid. Without text_bias the checkpoint is make_tiny's, byte for byte."""
    folder = make_tiny(folder, **{**SIZES, **sizes}, variant=variant, seed=5)
    if text_bias:
        scale_lm_head_rows(folder, text_bias)
    return folder


def scale_lm_head_rows(folder: str, factors: dict[str, float]) -> None:
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
    for token, factor in factors.items():
        weight[vocab[token]] *= factor
    tensors["lm_head.weight"] = weight.to(torch.bfloat16)
    save_tensors(tensors, shard)
