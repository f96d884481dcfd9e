"""An Instruct model's input images (image editing): each image enters the sequence twice, as the
reference does it (its `cond_joint_image` section):

  VAE run   the image resized to cover its nearest aspect bucket and centre-cropped (LANCZOS),
            VAE-encoded as a clean latent (a posterior sample from the image's seeded generator,
            drawn before the initial noise) and embedded by `patch_embed` at t = 0;
  ViT run   the image as transformers' Siglip2 processor makes it (the checkpoint's vit_processor
            settings: resized to fit max_num_patches, patchified, padded to every slot), through
            the SigLIP2 tower (transformers' Siglip2VisionModel, the checkpoint's `vision_model.*`)
            and the aligner (`vision_aligner.*`: Linear, GELU, ...), padding slots included.

Only the first pipeline stage embeds, so only its ranks hold these parts. Standard parts are the
libraries': the tower and the processor are transformers' classes, the VAE is the family's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...config import ConfigError
from ..base import rgb_image
from .tokenizer import CondImageLayout
from .vae import reference_autocast

VIT_TYPE = "siglip2-so400m-patch16-naflex"
# Keys of the vit dict that are the reference's runtime switches, not SigLIP2's architecture.
VIT_RUNTIME_KEYS = ("_attn_implementation", "output_attentions", "output_hidden_states", "use_return_dict")


def check_vision_config(raw: dict) -> None:
    """config.json's vision settings, where the model has them (refused naming the field)."""
    if "vit_type" not in raw:
        return
    if raw["vit_type"] != VIT_TYPE:
        raise ConfigError(f"config.json: vit_type {raw['vit_type']!r} is not supported (supported: {VIT_TYPE!r})")
    for name in ("vit", "vit_processor", "vit_aligner"):
        if not isinstance(raw.get(name), dict):
            raise ConfigError(f"config.json: {name} {raw.get(name)!r} must be an object (vit_type {VIT_TYPE!r})")
    aligner = raw["vit_aligner"]
    if aligner.get("projector_type") != "mlp_gelu":
        raise ConfigError(f"config.json: vit_aligner.projector_type {aligner.get('projector_type')!r} is not "
                          "supported (supported: 'mlp_gelu')")
    if raw.get("cond_image_type", "vae_vit") != "vae_vit" or raw.get("cond_token_attn_type", "full") != "full":
        raise ConfigError(f"config.json: cond_image_type {raw.get('cond_image_type')!r} / cond_token_attn_type "
                          f"{raw.get('cond_token_attn_type')!r} are not supported (supported: 'vae_vit', 'full')")


class Aligner(nn.Module):
    """vision_aligner (the reference's mlp_gelu projector): `layers` = Linear, then GELU and Linear,
    depth Linears in all."""

    def __init__(self, input_dim: int, n_embed: int, depth: int):
        super().__init__()
        layers = [nn.Linear(input_dim, n_embed)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(n_embed, n_embed)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


@dataclass
class PreparedImage:
    """One input image, made ready on the host: its VAE pixels and its processor's ViT inputs."""

    layout: CondImageLayout
    vae_pixels: torch.Tensor  # [1, 3, H, W] in [-1, 1], fp32
    vit_pixels: torch.Tensor  # [1, slots, 3·p·p]
    vit_mask: torch.Tensor  # [1, slots] int32, 1 for the real patches
    vit_shape: torch.Tensor  # [1, 2] the real patch grid


def cover_and_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale to cover height x width (LANCZOS), then crop the centre, with the reference's rounding."""
    W, H = image.size
    if H / W < height / width:
        size = (int(round(height / H * W)), height)
    else:
        size = (width, int(round(width / W * H)))
    image = image.resize(size, Image.LANCZOS)
    top, left = int(round((size[1] - height) / 2)), int(round((size[0] - width) / 2))
    return image.crop((left, top, left + width, top + height))


class ImageConditioner:
    """The input-image parts of one rank of the first stage: preparing, encoding and embedding."""

    def __init__(self, config, resolution, vae, device, dtype):
        """config: HunyuanImage3Config with vision settings; resolution: the model's ResolutionGroup;
        vae: an AutoencoderKLConv3D with its encoder (None on ranks that only prepare layouts)."""
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil

        raw = config.raw
        self.config, self.resolution, self.vae, self.device, self.dtype = config, resolution, vae, device, dtype
        self.processor = Siglip2ImageProcessorPil(**raw["vit_processor"])
        self.slots = int(raw["vit_processor"]["max_num_patches"])
        self.tower = self.aligner = None

    def build_encoders(self):
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        raw = self.config.raw
        fields = {k: v for k, v in raw["vit"].items() if k not in VIT_RUNTIME_KEYS}
        self.tower = Siglip2VisionModel(Siglip2VisionConfig(**fields)).to(self.device, self.dtype).eval()
        a = raw["vit_aligner"]
        self.aligner = Aligner(a["input_dim"], a["n_embed"], a["depth"]).to(self.device, self.dtype).eval()

    def load(self, checkpoint) -> None:
        """The tower's and the aligner's tensors (`vision_model.*`, `vision_aligner.*`); None: dummy."""
        self.build_encoders()
        if checkpoint is None:
            return
        from .weights import load_whole

        load_whole(self.tower, checkpoint, "vision_model.", f"the vision tower (config.json vit_type {VIT_TYPE!r})")
        load_whole(self.aligner, checkpoint, "vision_aligner.", "the vision aligner")

    def prepare(self, image) -> PreparedImage:
        """Host work of one input image (RGB, or an InputImage decoded here): its bucket, VAE
        pixels and ViT inputs."""
        image = rgb_image(image)
        W, H = image.size
        ratio_index = self.resolution.nearest_index(H, W)
        crop = np.asarray(cover_and_crop(image, *self.resolution.bucket(ratio_index)), dtype=np.float32)
        vae_pixels = torch.from_numpy(crop / 255.0).permute(2, 0, 1)[None].float().sub(0.5).div(0.5)
        vit = self.processor(image, return_tensors="pt")
        shape = vit["spatial_shapes"]
        layout = CondImageLayout(ratio_index, self.resolution.grid(ratio_index),
                                 (int(shape[0, 0]), int(shape[0, 1])), self.slots)
        return PreparedImage(layout, vae_pixels, vit["pixel_values"], vit["pixel_attention_mask"], shape)

    @torch.no_grad()
    def vae_latents(self, prepared: PreparedImage, noises: list[torch.Tensor]) -> torch.Tensor:
        """The clean latents [len(noises), C, h, w]: one encode, a posterior sample per noise, scaled
        (the sample in fp32: the reference's std is an fp32 exp of the autocast's fp16 logvar)."""
        with reference_autocast(self.device):
            mean, logvar = (m.float() for m in self.vae.encode_moments(prepared.vae_pixels.to(self.device)))
        return torch.cat([self.vae.sample_latents(mean, logvar, noise) for noise in noises])

    def vit_tokens(self, prepared: PreparedImage) -> torch.Tensor:
        """[1, slots, hidden]: the aligner of the tower's last hidden state, padding rows included."""
        out = self.tower(pixel_values=prepared.vit_pixels.to(self.device, self.dtype),
                         pixel_attention_mask=prepared.vit_mask.to(self.device),
                         spatial_shapes=prepared.vit_shape.to(self.device))
        return self.aligner(out.last_hidden_state)
