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


def make_checkpoint(folder: str, variant: str, **sizes) -> str:
    return make_tiny(folder, **{**SIZES, **sizes}, variant=variant, seed=5)
