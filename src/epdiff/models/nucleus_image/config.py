"""Nucleus-Image's transformer config (transformer/config.json of its diffusers folder), read once
and checked: every field behaves as in diffusers' NucleusMoEImageTransformer2DModel or is refused
here, naming the file and the field."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ...config import ConfigError, is_int, read_json_object

# diffusers' `dense_moe_strategy` values: which layers keep a dense MLP (diffusers treats any other
# string as all-MoE; a value it does not name is refused here instead).
DENSE_STRATEGIES = {
    "leave_first_three_and_last_block_dense": lambda i, n: 3 <= i < n - 1,
    "leave_first_three_blocks_dense": lambda i, n: i >= 3,
    "leave_first_block_dense": lambda i, n: i >= 1,
    "all_moe": lambda i, n: True,
    "all_dense": lambda i, n: False,
}
# Fields of the config that change nothing epdiff computes (diffusers' own bookkeeping, and its
# choice between a grouped GEMM and a loop for the experts).
IGNORED_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "use_grouped_mm")
CLASS_NAME = "NucleusMoEImageTransformer2DModel"


@dataclass(frozen=True)
class NucleusImageConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 24
    attention_head_dim: int = 128
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    mlp_ratio: float = 4.0
    moe_enabled: bool = True
    dense_moe_strategy: str = "leave_first_three_and_last_block_dense"
    num_experts: int = 128
    moe_intermediate_dim: int = 1344
    capacity_factors: float | tuple[float, ...] = 8.0
    use_sigmoid: bool = False
    route_scale: float = 2.5
    source: str = "config.json"  # the file read, for messages

    @classmethod
    def from_pretrained(cls, transformer_dir: str) -> "NucleusImageConfig":
        path = os.path.join(transformer_dir, "config.json")
        raw = read_json_object(path)
        if raw.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ConfigError(f"{path}: _class_name {raw['_class_name']!r}, expected {CLASS_NAME!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "source"}
        unknown = sorted(set(raw) - known - set(IGNORED_FIELDS))
        if unknown:
            raise ConfigError(f"{path}: field {unknown[0]!r} is not one epdiff implements for Nucleus-Image")
        values = {k: v for k, v in raw.items() if k in known}
        for key in ("axes_dims_rope", "capacity_factors"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        config = cls(**values, source=path)
        config.check()
        return config

    def _fail(self, field: str, why: str):
        raise ConfigError(f"{self.source}: {field} {getattr(self, field)!r}: {why}")

    def check(self) -> None:
        for name in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "num_experts", "moe_intermediate_dim"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                self._fail(name, "give a positive integer")
        if self.in_channels % (self.patch_size ** 2):
            self._fail("in_channels", f"not a multiple of patch_size² = {self.patch_size ** 2}")
        if self.out_channels is not None and (not is_int(self.out_channels) or self.out_channels < 1):
            self._fail("out_channels", "give a positive integer or null")
        kv = self.kv_heads
        if not is_int(kv) or kv < 1 or self.num_attention_heads % kv:
            self._fail("num_key_value_heads", f"must divide num_attention_heads {self.num_attention_heads}")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(not is_int(a) or a < 0 or a % 2 for a in axes) or sum(axes) != self.attention_head_dim:
            self._fail("axes_dims_rope", f"give three even sizes that sum to attention_head_dim "
                                         f"{self.attention_head_dim}")
        if self.dense_moe_strategy not in DENSE_STRATEGIES:
            self._fail("dense_moe_strategy", f"choose one of {', '.join(DENSE_STRATEGIES)}")
        for name in ("moe_enabled", "use_sigmoid"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "give true or false")
        factors = self.capacity_factors
        if isinstance(factors, tuple) and len(factors) != self.num_layers:
            self._fail("capacity_factors", f"{len(factors)} values for num_layers {self.num_layers}: give one per "
                                           "layer or a single number")
        for i in self.moe_layer_ids:
            f = self.capacity_factor(i)
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
                self._fail("capacity_factors", f"layer {i} is an MoE layer and needs a positive capacity factor")
        if self.dense_width < 1:
            self._fail("mlp_ratio", "gives dense MLPs of width 0 (diffusers rounds the width down to 128s)")
        if isinstance(self.route_scale, bool) or not isinstance(self.route_scale, (int, float)):
            self._fail("route_scale", "give a number")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size ** 2

    @property
    def output_channels(self) -> int:
        return self.out_channels if self.out_channels is not None else self.in_channels

    @property
    def dense_width(self) -> int:
        # diffusers' dense block width: 2/3 of mlp_ratio·hidden (SwiGLU), rounded down to 128s
        return int(self.hidden_size * self.mlp_ratio * 2 / 3) // 128 * 128

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_enabled and DENSE_STRATEGIES[self.dense_moe_strategy](index, self.num_layers)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def capacity_factor(self, index: int) -> float:
        factors = self.capacity_factors
        return factors[index] if isinstance(factors, tuple) else factors
