"""HunyuanImage-3.0 config.json, read into the fields the text-to-image path uses."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


def _per_layer(value, layers: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != layers:
            raise ValueError(f"config.json: {name} has {len(value)} entries for {layers} layers")
        return [int(v) for v in value]
    return [int(value)] * layers


@dataclass
class HunyuanImage3Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    moe_topk: list[int]
    moe_intermediate_size: list[int]
    num_shared_expert: list[int]
    use_mixed_mlp_moe: bool = True
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 22800
    patch_size: int = 1
    patch_embed_hidden_dim: int = 1024
    image_base_size: int = 1024
    vae_downsample_factor: tuple[int, int] = (16, 16)
    latent_channels: int = 32
    vae: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "HunyuanImage3Config":
        try:
            layers = int(cfg["num_hidden_layers"])
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            c = cls(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("attention_head_dim") or cfg.get("head_dim") or hidden // heads),
                vocab_size=int(cfg["vocab_size"]),
                num_experts=int(cfg.get("num_experts") or 0),
                moe_topk=_per_layer(cfg.get("moe_topk", 1), layers, "moe_topk"),
                moe_intermediate_size=_per_layer(cfg.get("moe_intermediate_size", cfg.get("intermediate_size")),
                                                 layers, "moe_intermediate_size"),
                num_shared_expert=_per_layer(cfg.get("num_shared_expert", 0), layers, "num_shared_expert"),
                use_mixed_mlp_moe=bool(cfg.get("use_mixed_mlp_moe", True)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 22800)),
                patch_size=int(cfg.get("patch_size", 1)),
                patch_embed_hidden_dim=int(cfg.get("patch_embed_hidden_dim", 1024)),
                image_base_size=int(cfg.get("image_base_size", 1024)),
                vae_downsample_factor=tuple(cfg.get("vae_downsample_factor", (16, 16))),
                latent_channels=int(cfg.get("vae", {}).get("latent_channels", 32)),
                vae=dict(cfg.get("vae", {})), raw=cfg)
        except KeyError as e:
            raise ValueError(f"config.json lacks the key {e.args[0]!r}") from None
        c.check()
        return c

    @classmethod
    def from_pretrained(cls, model_dir) -> "HunyuanImage3Config":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model folder {model_dir}")
        try:
            with open(path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(cfg)

    def check(self):
        if self.patch_size != 1:
            raise ValueError(f"config.json: patch_size {self.patch_size} is not supported (the release uses 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 4:
            raise ValueError(f"config.json: head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if any(k > self.num_experts for k in self.moe_topk) and self.num_experts:
            raise ValueError(f"config.json: moe_topk {max(self.moe_topk)} > num_experts {self.num_experts}")

    def shared_intermediate_size(self, layer: int) -> int:
        if not self.use_mixed_mlp_moe:
            return 0
        return self.moe_intermediate_size[layer] * self.num_shared_expert[layer]

    @property
    def vae_factor(self) -> int:
        return int(self.vae_downsample_factor[0])
