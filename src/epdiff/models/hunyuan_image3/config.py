"""HunyuanImage-3.0 config.json and generation_config.json, read into the fields the
text-to-image path uses.

Every field the reference reads either behaves as there or, where epdiff does not implement the
value, is refused here, at load, with one line naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ...config import ConfigError, read_json_object


_REQUIRED = object()


def _per_layer(value, layers: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)) and len(value) != layers:
        raise ConfigError(f"config.json: {name} has {len(value)} entries for {layers} layers")
    try:
        return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * layers
    except (TypeError, ValueError):
        raise ConfigError(f"config.json: {name} {value!r} is not an integer or a list of {layers}") from None


# Values of config.json fields epdiff implements; the first is what an absent key means. The
# reference accepts more for some (a LayerNorm for norm_type 'fused'/'torch_nn', a plain GELU MLP
# for hidden_act 'gelu', 1D RoPE for rope_type 'default'): those are refused, not ignored.
SUPPORTED_VALUES = {
    "hidden_act": ("silu",),
    "norm_type": ("hf_rms", "rms"),
    "rope_type": ("2d",),
    "img_proj_type": ("unet",),
    # epdiff follows the reference's recommended (flashinfer) routing, which never drops a token and
    # ignores the flag; only its eager path drops tokens over capacity when the flag is set.
    "moe_drop_tokens": (False, True),
    "use_qk_norm": (True,),
    "use_rotary_pos_emb": (True,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "cfg_distilled": (False, True),  # guidance_emb and a <guidance> token; no unconditional branch
    "use_meanflow": (False, True),  # timestep_r_emb and a <timestep_r> token
}
# The only RoPE scaling the reference knows; it never reads the factor.
ROPE_SCALING_TYPE = "custom"


def check_supported_fields(cfg: dict) -> None:
    for name, allowed in SUPPORTED_VALUES.items():
        value = cfg.get(name, allowed[0])
        if value not in allowed:
            raise ConfigError(f"config.json: {name} {value!r} is not supported (supported: "
                              f"{', '.join(repr(a) for a in allowed)})")
    rope_scaling = cfg.get("rope_scaling", {"type": ROPE_SCALING_TYPE})
    if not isinstance(rope_scaling, dict) or rope_scaling.get("type") != ROPE_SCALING_TYPE:
        raise ConfigError(f"config.json: rope_scaling {rope_scaling!r} is not supported (the reference knows only "
                          f"type {ROPE_SCALING_TYPE!r})")
    if cfg.get("use_meanflow", False) and not cfg.get("cfg_distilled", False):
        raise ConfigError("config.json: use_meanflow True without cfg_distilled is not supported (the reference "
                          "feeds the <timestep_r> token on its cached steps only for cfg-distilled models)")
    if isinstance(cfg.get("num_experts"), (list, tuple)):
        raise ConfigError(f"config.json: num_experts {cfg['num_experts']!r} per layer is not supported "
                          "(one expert count for every layer)")


# generation_config.json fields that pick the prompt template and the task. An absent key means
# the first value.
SUPPORTED_GENERATION_VALUES = {
    "sequence_template": ("pretrain", "instruct"),  # 'instruct' wraps the prompt in the chat roles
    # The reference's tasks: a request's default where it is image, think, recaption or
    # think_recaption (the Instruct models' text passes, family.py); else the image task.
    "bot_task": ("image", None, "auto", "think", "recaption", "think_recaption", "img_ratio"),
}


def check_generation_config(generation: dict, source: str = "generation_config.json") -> None:
    """Refuses generation settings epdiff does not implement (call on the file's contents)."""
    if not isinstance(generation, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(generation).__name__}")
    for name, allowed in SUPPORTED_GENERATION_VALUES.items():
        value = generation.get(name, allowed[0])
        if value not in allowed:
            shown = ", ".join(repr(a) for a in allowed if a is not None)
            raise ConfigError(f"{source}: {name} {value!r} is not supported (supported: {shown})")


@dataclass(frozen=True)
class GenerationConfig:
    """generation_config.json's image settings; a field's default is what an absent key means
    (the base model's values). The file's other keys are kept in `raw`: the language model's
    sampling, which the Instruct models' text passes read (family.py)."""

    diff_infer_steps: int = 50
    diff_guidance_scale: float = 5.0
    flow_shift: float = 3.0
    max_length: int = 12800
    sequence_template: str = "pretrain"
    use_system_prompt: str | None = "None"
    bot_task: str | None = "image"
    drop_think: bool = False
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, generation: dict, source: str = "generation_config.json") -> "GenerationConfig":
        check_generation_config(generation, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in generation.items() if k in known}, raw=dict(generation))

    def to_dict(self) -> dict:
        """The file's contents, as make-tiny writes it."""
        return {**self.raw, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "raw"}}


def read_generation_config(model_dir: str) -> GenerationConfig:
    """The folder's generation_config.json (the defaults where there is none); settings epdiff
    does not implement are refused, so that no loader runs a checkpoint whose template or task it
    would silently replace."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return GenerationConfig()
    return GenerationConfig.from_dict(read_json_object(path), path)


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
    intermediate_size: int | None = None  # the dense MLP's width (layers below moe_layer_num_skipped)
    moe_layer_num_skipped: int = 0
    use_mixed_mlp_moe: bool = True
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    group_limited_greedy: bool = False
    n_group: int = 1
    topk_group: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 22800
    patch_size: int = 1
    patch_embed_hidden_dim: int = 1024
    image_base_size: int = 1024
    vae_downsample_factor: tuple[int, int] = (16, 16)
    latent_channels: int = 32
    vae: dict = field(default_factory=dict)
    cfg_distilled: bool = False
    use_meanflow: bool = False
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict) -> "HunyuanImage3Config":
        check_supported_fields(cfg)

        def get(name, kind=int, default=_REQUIRED):
            if name not in cfg or cfg[name] is None:
                if default is _REQUIRED:
                    raise ConfigError(f"config.json lacks the key {name!r}")
                return default
            try:
                return kind(cfg[name])
            except (TypeError, ValueError):
                raise ConfigError(f"config.json: {name} {cfg[name]!r} is not a valid {kind.__name__}") from None

        layers, heads, hidden = get("num_hidden_layers"), get("num_attention_heads"), get("hidden_size")
        limited = get("group_limited_greedy", bool, False)
        vae = get("vae", dict, {})
        intermediate = get("intermediate_size", int, None)
        # Like the reference's MLP: the experts' width falls back to intermediate_size.
        moe_width = cfg.get("moe_intermediate_size")
        if moe_width is None:
            moe_width = get("intermediate_size")
        c = cls(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int, heads),
            head_dim=get("attention_head_dim", int, None) or get("head_dim", int, hidden // heads),
            vocab_size=get("vocab_size"),
            num_experts=get("num_experts", int, 0),
            moe_topk=_per_layer(cfg.get("moe_topk", 1), layers, "moe_topk"),
            moe_intermediate_size=_per_layer(moe_width, layers, "moe_intermediate_size"),
            num_shared_expert=_per_layer(cfg.get("num_shared_expert", 0), layers, "num_shared_expert"),
            intermediate_size=intermediate,
            moe_layer_num_skipped=get("moe_layer_num_skipped", int, 0),
            use_mixed_mlp_moe=get("use_mixed_mlp_moe", bool, True),
            norm_topk_prob=get("norm_topk_prob", bool, True),
            routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
            group_limited_greedy=limited,
            n_group=get("n_group") if limited else 1,
            topk_group=get("topk_group") if limited else 1,
            rms_norm_eps=get("rms_norm_eps", float, 1e-5),
            rope_theta=get("rope_theta", float, 10000.0),
            max_position_embeddings=get("max_position_embeddings", int, 22800),
            patch_size=get("patch_size", int, 1),
            patch_embed_hidden_dim=get("patch_embed_hidden_dim", int, 1024),
            image_base_size=get("image_base_size", int, 1024),
            vae_downsample_factor=get("vae_downsample_factor", tuple, (16, 16)),
            latent_channels=int(vae.get("latent_channels", 32)),
            cfg_distilled=get("cfg_distilled", bool, False), use_meanflow=get("use_meanflow", bool, False),
            vae=vae, raw=cfg)
        c.check()
        from .conditioning import check_vision_config
        check_vision_config(cfg)
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
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(cfg)

    def check(self):
        if self.patch_size != 1:
            raise ConfigError(f"config.json: patch_size {self.patch_size} is not supported (the release uses 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                              f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 4:
            raise ConfigError(f"config.json: head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if any(k > self.num_experts for k in self.moe_topk) and self.num_experts > 1:
            raise ConfigError(f"config.json: moe_topk {max(self.moe_topk)} > num_experts {self.num_experts}")
        if not 0 <= self.moe_layer_num_skipped:
            raise ConfigError(f"config.json: moe_layer_num_skipped {self.moe_layer_num_skipped} is negative")
        dense = [i for i in range(self.num_hidden_layers) if not self.is_moe_layer(i)]
        if dense and not self.intermediate_size:
            raise ConfigError(f"config.json: intermediate_size {self.intermediate_size!r} cannot size the dense "
                              f"MLP of layer(s) {dense}")
        if self.group_limited_greedy:
            if self.n_group < 1 or self.num_experts % self.n_group:
                raise ConfigError(f"config.json: n_group {self.n_group} does not divide num_experts "
                                  f"{self.num_experts} (group_limited_greedy)")
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"config.json: topk_group {self.topk_group} must be in [1, n_group "
                                  f"{self.n_group}] (group_limited_greedy)")
            reachable = self.topk_group * (self.num_experts // self.n_group)
            for i in range(self.num_hidden_layers):
                if self.is_moe_layer(i) and self.moe_topk[i] > reachable:
                    raise ConfigError(f"config.json: moe_topk {self.moe_topk[i]} exceeds the {reachable} experts "
                                      f"of topk_group {self.topk_group} groups (group_limited_greedy)")

    def is_moe_layer(self, layer: int) -> bool:
        """As the reference: MoE where there is more than one expert, from moe_layer_num_skipped on."""
        return self.num_experts > 1 and layer >= self.moe_layer_num_skipped

    def mlp_width(self, layer: int) -> int:
        """The width of a layer's dense MLP (its experts' width in an MoE layer)."""
        return self.moe_intermediate_size[layer] if self.is_moe_layer(layer) else self.intermediate_size

    def shared_intermediate_size(self, layer: int) -> int:
        if not self.use_mixed_mlp_moe:
            return 0
        return self.moe_intermediate_size[layer] * self.num_shared_expert[layer]

    def router_options(self, layer: int) -> dict:
        """The Router's options for an MoE layer. The reference renormalises the top-k weights
        only when norm_topk_prob and k > 1; otherwise it multiplies them by routed_scaling_factor
        (so a top-1 router gives weight p·factor, not 1)."""
        renormalize = self.norm_topk_prob and self.moe_topk[layer] > 1
        return dict(renormalize=renormalize, scaling_factor=1.0 if renormalize else self.routed_scaling_factor,
                    num_groups=self.n_group, topk_groups=self.topk_group)

    @property
    def num_step_tokens(self) -> int:
        """Tokens a denoising step writes before the image: <timestep>, <guidance> (cfg-distilled),
        <timestep_r> (mean flow)."""
        return 1 + self.cfg_distilled + self.use_meanflow

    @property
    def vae_factor(self) -> int:
        return int(self.vae_downsample_factor[0])
