"""HunyuanImage-3.0 VAE: `AutoencoderKLConv3D`, a KL autoencoder built from 3D convolutions.

32 latent channels, 16x spatial and 4x temporal compression, DC-AE style down/upsampling
(space-to-depth / depth-to-space plus a parameter-free shortcut that averages or repeats
channels). A still image is treated as a clip: encode repeats it `ffactor_temporal` times, decode
turns one latent frame into `ffactor_temporal` frames and the pipeline keeps the last one.

Module and parameter names follow the release exactly: this module's `state_dict()` keys are the
checkpoint's `vae.*` keys with the `vae.` prefix removed, so release weights load 1:1.

Facts matched from the release `hunyuan_image_3/autoencoder_kl_3d.py` (read through the
vLLM-Omni and SGLang ports, which keep its names; see the test file for the pinned ones):
- every 3x3x3 conv pads symmetrically with zeros in T, H and W (`padding=1`). It is *not* causal:
  with one frame, only the middle temporal tap of each kernel sees data;
- GroupNorm(32 groups, eps 1e-6, affine) everywhere, activation x * sigmoid(x);
- the mid block is ResNet -> single-head self-attention over all (t, h, w) positions (no mask,
  1x1x1 conv projections q/k/v/proj_out) -> ResNet;
- there is no quant_conv / post_quant_conv: the encoder's conv_out emits [mean; logvar]
  (2 * latent_channels) and the decoder's conv_in takes the latent directly; both ends carry a
  channel-averaging / channel-repeating shortcut around their convolution.

The reference encodes and decodes under fp16 autocast on a GPU (fp32 weights): `reference_autocast`.
Without it every op runs in the module's own dtype (fp32 on CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...config import is_int
from ...kernels import norm as norm_kernels

# GroupNorm group count is hard-coded in the release; every channel count must divide by it.
NORM_GROUPS = 32
NORM_EPS = 1e-6
# DiagonalGaussianDistribution bounds in the reference, so exp() stays finite.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# The `vae` dict of the release config.json (values from the reference notes §1 and the ports).
RELEASE_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 32,
    "block_out_channels": [128, 256, 512, 1024, 1024],
    "layers_per_block": 2,
    "ffactor_spatial": 16,
    "ffactor_temporal": 4,
    "sample_size": 384,
    "sample_tsize": 96,
    "scaling_factor": 0.562679178327931,
    "shift_factor": None,
    "downsample_match_channel": True,
    "upsample_match_channel": True,
}

_REQUIRED_INT_KEYS = ("in_channels", "out_channels", "latent_channels", "layers_per_block",
                      "ffactor_spatial", "ffactor_temporal")


# ----------------------------------------------------------------------------------------------
# config


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _encoder_levels(cfg: dict) -> list[tuple[int, int, int | None]]:
    """Per encoder level: (channels of its ResNet blocks, channels after it, resample factor).

    The factor is 4 (2x2 spatial), 8 (2x2x2 with time) or None (no downsample). Spatial
    downsampling happens at the first log2(ffactor_spatial) levels; the last log2(ffactor_temporal)
    of those also halve time, so the deepest levels are the ones that see fewer frames.
    """
    channels = cfg["block_out_channels"]
    n_spatial = int(math.log2(cfg["ffactor_spatial"]))
    n_temporal = int(math.log2(cfg["ffactor_temporal"]))
    levels = []
    for i, ch in enumerate(channels):
        factor = None
        ch_next = ch
        if i < n_spatial:
            factor = 8 if i >= n_spatial - n_temporal else 4
            ch_next = channels[i + 1] if cfg["downsample_match_channel"] else ch
        levels.append((ch, ch_next, factor))
    return levels


def _decoder_levels(cfg: dict) -> list[tuple[int, int, int | None]]:
    """Like `_encoder_levels` for the decoder, which walks the channel list in reverse and puts
    the temporal upsamples at its first (deepest) levels, mirroring the encoder."""
    channels = list(reversed(cfg["block_out_channels"]))
    n_spatial = int(math.log2(cfg["ffactor_spatial"]))
    n_temporal = int(math.log2(cfg["ffactor_temporal"]))
    levels = []
    for i, ch in enumerate(channels):
        factor = None
        ch_next = ch
        if i < n_spatial:
            factor = 8 if i < n_temporal else 4
            ch_next = channels[i + 1] if cfg["upsample_match_channel"] else ch
        levels.append((ch, ch_next, factor))
    return levels


def validate_vae_config(config: dict) -> dict:
    """Check a `vae` config dict and return a copy with the optional keys filled in.

    Valid combinations (each rule is what the release architecture needs to be well defined):
    - in_channels, out_channels, latent_channels, layers_per_block: positive ints;
    - ffactor_spatial, ffactor_temporal: powers of two, ffactor_temporal <= ffactor_spatial;
    - len(block_out_channels) >= log2(ffactor_spatial) + 1 (one level per 2x downsample, plus
      the deepest level, which never resamples);
    - every entry of block_out_channels a multiple of 32 (GroupNorm with 32 groups);
    - block_out_channels[-1] a multiple of 2 * latent_channels (the encoder's output shortcut
      averages equal groups of channels into [mean; logvar]);
    - at each resampling level, channel counts the DC-AE shortcut can split or repeat evenly:
      downsample c_in -> c_out by factor f needs f*c_in a multiple of c_out and c_out <= f*c_in;
      upsample needs f*c_out a multiple of c_in and c_in <= f*c_out;
    - scaling_factor: None or > 0; shift_factor: None or a number.
    Unknown keys are kept and ignored (the release dict may carry more).
    """
    if not isinstance(config, dict):
        raise ValueError(f"vae config must be a dict, got {type(config).__name__}")
    missing = [key for key in (*_REQUIRED_INT_KEYS, "block_out_channels") if key not in config]
    if missing:
        raise ValueError(f"vae config is missing {', '.join(missing)}")
    cfg = dict(config)
    cfg.setdefault("downsample_match_channel", True)
    cfg.setdefault("upsample_match_channel", True)
    cfg.setdefault("scaling_factor", None)
    cfg.setdefault("shift_factor", None)

    for key in _REQUIRED_INT_KEYS:
        if not is_int(cfg[key]) or cfg[key] < 1:
            raise ValueError(f"vae.{key} must be a positive integer, got {cfg[key]!r}")
    for key in ("downsample_match_channel", "upsample_match_channel"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"vae.{key} must be true or false, got {cfg[key]!r}")

    fs, ft = cfg["ffactor_spatial"], cfg["ffactor_temporal"]
    if not _is_power_of_two(fs):
        raise ValueError(f"vae.ffactor_spatial must be a power of two, got {fs}")
    if not _is_power_of_two(ft):
        raise ValueError(f"vae.ffactor_temporal must be a power of two, got {ft}")
    if ft > fs:
        raise ValueError(f"vae.ffactor_temporal ({ft}) must not exceed vae.ffactor_spatial ({fs}): "
                         "time is only halved at levels that also halve space")

    channels = cfg["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or not all(is_int(c) and c > 0 for c in channels):
        raise ValueError(f"vae.block_out_channels must be a non-empty list of positive integers, got {channels!r}")
    cfg["block_out_channels"] = list(channels)
    n_spatial = int(math.log2(fs))
    if len(channels) < n_spatial + 1:
        raise ValueError(f"vae.block_out_channels has {len(channels)} levels, but ffactor_spatial={fs} needs "
                         f"at least {n_spatial + 1} (one per 2x downsample plus the deepest level)")
    bad = [c for c in channels if c % NORM_GROUPS]
    if bad:
        raise ValueError(f"vae.block_out_channels {channels}: {bad} not a multiple of {NORM_GROUPS} "
                         f"(the release uses GroupNorm with {NORM_GROUPS} groups)")
    latent = cfg["latent_channels"]
    if channels[-1] % (2 * latent):
        raise ValueError(f"vae.block_out_channels[-1]={channels[-1]} must be a multiple of "
                         f"2 * latent_channels = {2 * latent}")

    for i, (c_in, c_out, factor) in enumerate(_encoder_levels(cfg)):
        if factor is not None and ((factor * c_in) % c_out or c_out > factor * c_in):
            raise ValueError(f"vae.block_out_channels {channels}: encoder level {i} downsamples {c_in} -> {c_out} "
                             f"channels by {factor}; needs {factor}*{c_in} to be a multiple of {c_out} "
                             f"and at least {c_out}")
    for i, (c_in, c_out, factor) in enumerate(_decoder_levels(cfg)):
        if factor is not None and ((factor * c_out) % c_in or c_in > factor * c_out):
            raise ValueError(f"vae.block_out_channels {channels}: decoder level {i} upsamples {c_in} -> {c_out} "
                             f"channels by {factor}; needs {factor}*{c_out} to be a multiple of {c_in} "
                             f"and at least {c_in}")

    scale, shift = cfg["scaling_factor"], cfg["shift_factor"]
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
        raise ValueError(f"vae.scaling_factor must be a positive number or null, got {scale!r}")
    if shift is not None and (not isinstance(shift, (int, float)) or isinstance(shift, bool)):
        raise ValueError(f"vae.shift_factor must be a number or null, got {shift!r}")
    return cfg


def vae_config_tiny(block_out_channels=(32, 32, 64, 64, 64), latent_channels: int = 32,
                    layers_per_block: int = 1, ffactor_spatial: int = 16, ffactor_temporal: int = 4,
                    **overrides) -> dict:
    """A small valid config with the release's keys, for tests and tiny checkpoints.

    Channels cannot go below 32 (GroupNorm groups) and the last one must be a multiple of
    2 * latent_channels, so with the release's 32 latent channels the deepest width is >= 64.
    """
    config = dict(RELEASE_VAE_CONFIG)
    config.update(block_out_channels=list(block_out_channels), latent_channels=latent_channels,
                  layers_per_block=layers_per_block, ffactor_spatial=ffactor_spatial,
                  ffactor_temporal=ffactor_temporal)
    config.update(overrides)
    return validate_vae_config(config)


# ----------------------------------------------------------------------------------------------
# building blocks


def swish(x: torch.Tensor) -> torch.Tensor:
    # Spelled like the reference rather than F.silu, so fp32 results agree to the last bit.
    return x * torch.sigmoid(x)


def conv3x3x3(in_channels: int, out_channels: int) -> nn.Conv3d:
    # Zero padding on both sides of T as well as H and W: the release convs are not causal.
    return nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, with the swish that follows it where `with_swish`. On a GPU (Triton) its fp32
    statistics are spread over the whole GPU, where torch's kernel runs one program per (image,
    group), 32 for one image: a third of a 1024² decode's time (BENCHMARKS §22); normalising, the
    affine and the swish are one pass, written in the autocast dtype that the convolution after it
    reads (else x's dtype)."""

    def forward(self, x: torch.Tensor, with_swish: bool = False) -> torch.Tensor:
        if kernels.available(x):
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            return norm_kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, with_swish, dtype)
        y = super().forward(x)
        return swish(y) if with_swish else y


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=NORM_EPS, affine=True)


def space_to_depth(x: torch.Tensor, time_factor: int) -> torch.Tensor:
    """[B, C, T*r, 2H, 2W] -> [B, (r, 2, 2, C), T, H, W]: the channel index runs over the time
    offset slowest, then the row offset, the column offset, and the source channel fastest."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // time_factor, time_factor, h // 2, 2, w // 2, 2)
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6)
    return x.reshape(b, time_factor * 4 * c, t // time_factor, h // 2, w // 2)


def depth_to_space(x: torch.Tensor, time_factor: int) -> torch.Tensor:
    """Inverse of `space_to_depth`: [B, (r, 2, 2, C), T, H, W] -> [B, C, T*r, 2H, 2W]."""
    b, c_packed, t, h, w = x.shape
    c = c_packed // (time_factor * 4)
    x = x.reshape(b, time_factor, 2, 2, c, t, h, w)
    x = x.permute(0, 4, 5, 1, 6, 2, 7, 3)
    return x.reshape(b, c, t * time_factor, h * 2, w * 2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv3x3x3(in_channels, out_channels)
        self.norm2 = group_norm(out_channels)
        self.conv2 = conv3x3x3(out_channels, out_channels)
        # Only present when the width changes, as in the checkpoint.
        self.nin_shortcut = nn.Conv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(self.norm1(x, with_swish=True))
        h = self.conv2(self.norm2(h, with_swish=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over every (t, h, w) position, unmasked."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv3d(channels, channels, kernel_size=1)
        self.k = nn.Conv3d(channels, channels, kernel_size=1)
        self.v = nn.Conv3d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv3d(channels, channels, kernel_size=1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        normed = self.norm(x)

        def tokens(proj):  # [B, C, T, H, W] -> [B, 1 head, T*H*W, C]
            return proj(normed).flatten(2).transpose(1, 2).unsqueeze(1)

        out = F.scaled_dot_product_attention(tokens(self.q), tokens(self.k), tokens(self.v))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, t, h, w)
        return x + self.proj_out(out)


class DownsampleDCAE(nn.Module):
    """Halve H and W (and T when `temporal`) by moving pixels into channels.

    The conv makes out_channels / factor channels at full resolution, which space_to_depth packs
    into out_channels; the shortcut packs the input the same way and averages consecutive groups
    of factor * in_channels / out_channels channels, so it needs no weights.
    """

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.time_factor = 2 if temporal else 1
        factor = 4 * self.time_factor
        self.conv = conv3x3x3(in_channels, out_channels // factor)
        self.group_size = factor * in_channels // out_channels

    def forward(self, x):
        h = space_to_depth(self.conv(x), self.time_factor)
        shortcut = space_to_depth(x, self.time_factor)
        b, _, t, hh, ww = shortcut.shape
        shortcut = shortcut.reshape(b, h.shape[1], self.group_size, t, hh, ww).mean(dim=2)
        return h + shortcut


class UpsampleDCAE(nn.Module):
    """Double H and W (and T when `temporal`) by moving channels into pixels; the shortcut
    repeats each input channel factor * out_channels / in_channels times before unpacking."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool):
        super().__init__()
        self.time_factor = 2 if temporal else 1
        factor = 4 * self.time_factor
        self.conv = conv3x3x3(in_channels, out_channels * factor)
        self.repeats = factor * out_channels // in_channels

    def forward(self, x):
        h = depth_to_space(self.conv(x), self.time_factor)
        shortcut = depth_to_space(x.repeat_interleave(self.repeats, dim=1), self.time_factor)
        return h + shortcut


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_blocks: int, out_channels: int, factor: int | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else channels, channels) for i in range(num_blocks))
        # None (so no keys) at the deepest level(s), as in the checkpoint.
        self.downsample = DownsampleDCAE(channels, out_channels, temporal=factor == 8) if factor else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class DecoderLevel(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_blocks: int, out_channels: int, factor: int | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else channels, channels) for i in range(num_blocks))
        self.upsample = UpsampleDCAE(channels, out_channels, temporal=factor == 8) if factor else None

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """[B, in_channels, T, H, W] -> [B, 2 * latent_channels (mean; logvar), T/ft, H/fs, W/fs]."""

    def __init__(self, cfg: dict):
        super().__init__()
        channels = cfg["block_out_channels"]
        self.moment_channels = 2 * cfg["latent_channels"]
        self.conv_in = conv3x3x3(cfg["in_channels"], channels[0])
        self.down = nn.ModuleList()
        block_in = channels[0]
        for ch, ch_next, factor in _encoder_levels(cfg):
            self.down.append(EncoderLevel(block_in, ch, cfg["layers_per_block"], ch_next, factor))
            block_in = ch_next
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = conv3x3x3(block_in, self.moment_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        # Weight-free path to the moments: average consecutive groups of channels.
        b, c, t, hh, ww = h.shape
        shortcut = h.reshape(b, self.moment_channels, c // self.moment_channels, t, hh, ww).mean(dim=2)
        return self.conv_out(self.norm_out(h, with_swish=True)) + shortcut


class Decoder(nn.Module):
    """[B, latent_channels, T, h, w] -> [B, out_channels, T*ft, h*fs, w*fs]."""

    def __init__(self, cfg: dict):
        super().__init__()
        channels = list(reversed(cfg["block_out_channels"]))
        self.latent_channels = cfg["latent_channels"]
        self.conv_in = conv3x3x3(self.latent_channels, channels[0])
        self.mid = MidBlock(channels[0])
        self.up = nn.ModuleList()
        block_in = channels[0]
        # One more ResNet per level than the encoder, as in the release.
        for ch, ch_next, factor in _decoder_levels(cfg):
            self.up.append(DecoderLevel(block_in, ch, cfg["layers_per_block"] + 1, ch_next, factor))
            block_in = ch_next
        self.norm_out = group_norm(block_in)
        self.conv_out = conv3x3x3(block_in, cfg["out_channels"])

    def forward(self, z):
        # Weight-free path from the latent: repeat each latent channel to fill the first width.
        repeats = self.conv_in.out_channels // self.latent_channels
        h = self.conv_in(z) + z.repeat_interleave(repeats, dim=1)
        h = self.mid(h)
        for level in self.up:
            h = level(h)
        return self.conv_out(self.norm_out(h, with_swish=True))


# ----------------------------------------------------------------------------------------------
# the autoencoder


class AutoencoderKLConv3D(nn.Module):
    """The release VAE. Build from the config.json `vae` dict; load `vae.*` tensors (prefix
    stripped) with `load_state_dict`. `with_encoder=False` skips the encoder, which text-to-image
    never uses; its keys are then simply absent."""

    def __init__(self, config: dict, with_encoder: bool = True, with_decoder: bool = True):
        super().__init__()
        self.config = validate_vae_config(config)
        self.latent_channels = self.config["latent_channels"]
        self.ffactor_spatial = self.config["ffactor_spatial"]
        self.ffactor_temporal = self.config["ffactor_temporal"]
        # The reference skips scaling / shifting when the value is null (or zero).
        self.scaling_factor = float(self.config["scaling_factor"] or 1.0)
        self.shift_factor = float(self.config["shift_factor"] or 0.0)
        self.encoder = Encoder(self.config) if with_encoder else None
        self.decoder = Decoder(self.config) if with_decoder else None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C, H, W] in [-1, 1] -> posterior (mean, logvar), each [B, latent, h, w],
        unscaled. A still image is repeated over `ffactor_temporal` frames, as in the reference,
        so the encoder's temporal downsampling leaves exactly one latent frame."""
        if self.encoder is None:
            raise RuntimeError("this AutoencoderKLConv3D was built with with_encoder=False")
        if images.ndim != 4:
            raise ValueError(f"encode expects images [B, C, H, W], got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.ffactor_spatial or width % self.ffactor_spatial:
            raise ValueError(f"image size {height}x{width} is not a multiple of ffactor_spatial={self.ffactor_spatial}")
        clip = images.to(self.dtype)[:, :, None].expand(-1, -1, self.ffactor_temporal, -1, -1)
        moments = self.encoder(clip).squeeze(2)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode(self, images: torch.Tensor, sample_posterior: bool = True,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> latents [B, latent, H/fs, W/fs] in the diffusion
        model's space: (z - shift_factor) * scaling_factor. The reference (training and its
        conditioning-image path) samples the posterior; `sample_posterior=False` takes the mean.
        noise: the posterior's standard normal draw, if the caller made it (else from generator)."""
        mean, logvar = self.encode_moments(images)
        if not sample_posterior:
            return (mean - self.shift_factor) * self.scaling_factor
        if noise is None:  # drawn on the generator's device and moved, like diffusers' randn_tensor
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
        return self.sample_latents(mean, logvar, noise)

    def sample_latents(self, mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A posterior sample (mean, logvar from encode_moments; noise standard normal), scaled."""
        latents = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return (latents - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw decoder on unscaled latents [B, latent, T, h, w] -> [B, C, T*ft, H, W]."""
        if self.decoder is None:
            raise RuntimeError("this AutoencoderKLConv3D was built with with_decoder=False")
        return self.decoder(z.to(self.dtype))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents [B, latent, h, w] -> images [B, C, h*fs, w*fs], nominally in [-1, 1]
        (not clamped). Steps as in the reference pipeline: undo the scale (and shift), add a time
        axis of one frame, decode (which yields ffactor_temporal frames), keep the last frame."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode_latents expects latents [B, {self.latent_channels}, h, w], "
                             f"got shape {tuple(latents.shape)}")
        z = latents.to(self.dtype) / self.scaling_factor + self.shift_factor
        frames = self.decode(z[:, :, None])
        return frames[:, :, -1]


def reference_autocast(device: torch.device):
    """fp16 autocast on a GPU, as the reference runs its VAE both ways (fp32 weights): on an H100
    the 1024² decode 0.63 -> 0.47 s, an edit's 1024² encode ~0.17 s of fp32 convolutions less
    (BENCHMARKS §18, §23); nothing on a CPU, where the parity tests run in fp32."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3].

    Same arithmetic as the reference's diffusers VaeImageProcessor.postprocess(output_type="pil"):
    (x / 2 + 0.5).clamp(0, 1), then (x * 255).round() (round half to even, as numpy does), in fp32.
    The reference denormalizes in the decoder's output dtype (fp16 under its autocast) before
    casting to fp32; we always use fp32, which is identical for fp32 input.
    """
    if images.ndim != 4:
        raise ValueError(f"to_uint8 expects images [B, C, H, W], got shape {tuple(images.shape)}")
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
