"""Nucleus-Image's MoE diffusion transformer (diffusers' NucleusMoEImageTransformer2DModel) on the
parallel runtime.

Single-stream DiT over the image tokens: each block modulates them with the timestep (scale and
gate, no shift), attends with the image's own Q/K/V plus keys and values projected from the text
(cross-attention: text is never a query), then runs a dense SwiGLU MLP or the expert-choice MoE,
whose router sees [timestep embedding, unmodulated hidden] while the experts compute on the
modulated hidden. Module paths follow the diffusers checkpoint except inside the generic MLP and
MoE modules, whose names weights.py maps.

Text keys and values are the same on every denoising step: `encode_text` computes them once per
batch (the `RequestCache`), and each step reuses them. Under SP the image tokens are split over the
ranks (Ulysses for attention; the expert-choice router gathers its scores), the text is whole on
every rank.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...distributed.parallel_state import ParallelState
from ...distributed.pipeline_parallel import StageLink, stage_layers
from ...distributed.sequence_parallel import gather_heads, gather_sequence, local_chunk, scatter_heads
from ...layers.linear import ColumnParallelLinear, RowParallelLinear
from ...layers.mlp import SwiGLUMLP
from ...kernels import norm as norm_kernels
from ...layers.norm import RMSNorm
from ...moe.layer import MoELayer
from ...moe.router import ExpertChoiceRouter
from ...sampling.step_cache import FirstBlockCache, run_blocks
from ..hunyuan_image3.attention import sdpa
from .config import NucleusImageConfig

NORM_EPS = 1e-6
ROPE_THETA = 10000.0


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without weight or bias (the blocks' pre-norms and the output norm)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def modulated_norm(x: torch.Tensor, scale: torch.Tensor, update: torch.Tensor | None = None,
                   gate: torch.Tensor | None = None, with_normed: bool = False):
    """layer_norm(x) · scale, scale [B, 1, D] per image; with update and gate, x + gate · update
    first. Returns (the modulated norm, the new x or None, the unmodulated norm or None): one pass
    on a GPU (kernels/norm.py), the eager formula elsewhere."""
    if kernels.available(x):
        return norm_kernels.modulated_layer_norm(x, scale[:, 0], NORM_EPS, update,
                                                 None if gate is None else gate[:, 0], with_normed)
    if update is not None:
        x = x + gate * update
    normed = layer_norm(x)
    return normed * scale, x if update is not None else None, normed if with_normed else None


def timestep_sinusoid(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of scale·t at dim/2 frequencies (diffusers' Timesteps with flip_sin_to_cos,
    no frequency shift); t is sigma, in [0, 1]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """`time_text_embed`: sinusoid -> Linear(d, 4d), SiLU, Linear(4d, d) -> RMSNorm."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.dim = dim
        self.timestep_embedder = nn.Module()
        self.timestep_embedder.linear_1 = nn.Linear(dim, 4 * dim, dtype=dtype, device=device)
        self.timestep_embedder.linear_2 = nn.Linear(4 * dim, dim, dtype=dtype, device=device)
        self.norm = RMSNorm(dim, NORM_EPS, dtype=dtype, device=device)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = self.timestep_embedder
        h = timestep_sinusoid(t, self.dim).to(e.linear_1.weight.dtype)
        return self.norm(e.linear_2(F.silu(e.linear_1(h))))


def rope_frequencies(axes: tuple[int, int, int], positions: torch.Tensor) -> torch.Tensor:
    """positions [L, 3] (frame, row, column) -> unit complex rotations [L, head_dim/2], one band
    of frequencies per axis (theta 10000 within each axis)."""
    bands = []
    for axis, dim in enumerate(axes):
        inv = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = torch.outer(positions[:, axis].float(), inv.to(positions.device))
        bands.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(bands, dim=-1)


def image_positions(h: int, w: int) -> torch.Tensor:
    """[h·w, 3]: frame 0, rows and columns centred (row r at r - ceil(h/2), as diffusers' scale_rope)."""
    rows = torch.arange(h) - (h - h // 2)
    cols = torch.arange(w) - (w - w // 2)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(h * w, 1, dtype=torch.long), grid], dim=1)


def text_positions(h: int, w: int, length: int) -> torch.Tensor:
    """[length, 3]: text token j at max(h//2, w//2) + j on every axis (after the image's extent)."""
    index = max(h // 2, w // 2) + torch.arange(length)
    return index[:, None].expand(length, 3)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] (adjacent pairs are complex numbers) rotated by freqs [S, D/2]."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs[:, None]).flatten(3).type_as(x)


@dataclass
class TextKV:
    """One block's text keys and values for this rank's heads, computed once per batch."""

    k: torch.Tensor  # [B, L, KV_local, D]
    v: torch.Tensor


@dataclass
class RequestCache:
    """What every step of a batch reads and none changes, computed at its start."""

    blocks: dict[str, TextKV]
    key_mask: torch.Tensor | None  # [B, L]: False at padding (None: no padding)
    image_freqs: torch.Tensor  # [h·w / SP, D/2]: this rank's image tokens' rotations


class Attention(nn.Module):
    """Image queries against [image keys; text keys] (GQA), heads sharded over TP (whole KV groups)."""

    def __init__(self, c: NucleusImageConfig, parallel: ParallelState, dtype, device, quant_config=None):
        super().__init__()
        d, hd, tp = c.hidden_size, c.attention_head_dim, parallel.tp
        self.tp, self.sp, self.head_dim = tp, parallel.sp, hd
        self.heads, self.kv_heads = c.num_attention_heads // tp.size, c.kv_heads // tp.size
        kw = dict(dtype=dtype, device=device, quant_config=quant_config)
        self.to_q = ColumnParallelLinear(d, c.num_attention_heads * hd, tp, **kw)
        self.to_k = ColumnParallelLinear(d, c.kv_heads * hd, tp, **kw)
        self.to_v = ColumnParallelLinear(d, c.kv_heads * hd, tp, **kw)
        self.add_k_proj = ColumnParallelLinear(d, c.kv_heads * hd, tp, **kw)
        self.add_v_proj = ColumnParallelLinear(d, c.kv_heads * hd, tp, **kw)
        self.norm_q = RMSNorm(hd, NORM_EPS, dtype=dtype, device=device)
        self.norm_k = RMSNorm(hd, NORM_EPS, dtype=dtype, device=device)
        self.norm_added_k = RMSNorm(hd, NORM_EPS, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([RowParallelLinear(c.num_attention_heads * hd, d, tp, **kw)])

    def text_kv(self, context: torch.Tensor, freqs: torch.Tensor) -> TextKV:
        """context [B, L, hidden] (the block's projected text) -> this SP rank's heads' text K/V."""
        B, L, _ = context.shape
        k = apply_rope(self.norm_added_k(self.add_k_proj(context).view(B, L, self.kv_heads, self.head_dim)), freqs)
        v = self.add_v_proj(context).view(B, L, self.kv_heads, self.head_dim)
        heads = self.kv_heads // self.sp.size  # Ulysses: this SP rank attends with its 1/SP of the heads
        lo = self.sp.rank * heads
        return TextKV(k[:, :, lo:lo + heads].contiguous(), v[:, :, lo:lo + heads].contiguous())

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, text: TextKV, key_mask: torch.Tensor | None):
        """x [B, S/SP, hidden]: this SP rank's image tokens; freqs [S/SP, D/2] their rotations."""
        B, s, _ = x.shape
        q = self._norm_rope(self.norm_q, self.to_q(x).view(B, s, self.heads, self.head_dim), freqs)
        k = self._norm_rope(self.norm_k, self.to_k(x).view(B, s, self.kv_heads, self.head_dim), freqs)
        v = self.to_v(x).view(B, s, self.kv_heads, self.head_dim)
        q, k, v = (scatter_heads(t, self.sp) for t in (q, k, v))  # whole image, 1/SP of the heads
        if key_mask is not None:
            key_mask = F.pad(key_mask, (k.shape[1], 0), value=True)
        out = sdpa(q, torch.cat([k, text.k], dim=1), torch.cat([v, text.v], dim=1), key_mask=key_mask)
        return self.to_out[0](gather_heads(out, self.sp).flatten(2))

    @staticmethod
    def _norm_rope(norm: RMSNorm, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        if kernels.available(x) and norm_kernels.rms_norm_rope_pairs_supported(x):  # one pass, not five
            return norm_kernels.rms_norm_rope_pairs(x, norm.weight, torch.view_as_real(freqs), norm.eps)
        return apply_rope(norm(x), freqs)


class TransformerBlock(nn.Module):
    def __init__(self, c: NucleusImageConfig, index: int, parallel: ParallelState, dtype, device,
                 quant_config=None):
        super().__init__()
        d, kw = c.hidden_size, dict(dtype=dtype, device=device)
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d, **kw))
        self.encoder_proj = nn.Linear(c.joint_attention_dim, d, **kw)
        self.attn = Attention(c, parallel, dtype, device, quant_config)
        self.is_moe = c.is_moe_layer(index)
        if self.is_moe:
            router = ExpertChoiceRouter(2 * d, c.num_experts, c.capacity_factor(index), parallel.sp,
                                        "sigmoid" if c.use_sigmoid else "softmax", c.route_scale, dtype)
            self.img_mlp = MoELayer(d, c.num_experts, c.num_experts, c.moe_intermediate_dim, parallel,
                                    shared_intermediate_size=c.moe_intermediate_dim, router=router,
                                    quant_config=quant_config, **kw)
        else:
            self.img_mlp = SwiGLUMLP(d, c.dense_width, parallel.tp, quant_config=quant_config, **kw)

    def text_kv(self, text: torch.Tensor, freqs: torch.Tensor) -> TextKV:
        return self.attn.text_kv(self.encoder_proj(text), freqs)

    def forward(self, x, temb, freqs, text: TextKV, key_mask):
        scale1, gate1, scale2, gate2 = self.img_mod(temb)[:, None].chunk(4, dim=-1)
        attn = self.attn(modulated_norm(x, 1 + scale1)[0], freqs, text, key_mask)
        modulated, x, normed = modulated_norm(x, 1 + scale2, attn, gate1.clamp(-2.0, 2.0).tanh(), self.is_moe)
        if self.is_moe:
            mlp = self.img_mlp(modulated, router_input=(temb, normed))  # the router scores [temb, normed]
        else:
            mlp = self.img_mlp(modulated)
        return torch.addcmul(x, gate2.clamp(-2.0, 2.0).tanh(), mlp)  # x + gate · mlp in one pass


class OutputNorm(nn.Module):
    """`norm_out`: LayerNorm(x)·(1 + scale) + shift, (scale, shift) = Linear(SiLU(temb))."""

    def __init__(self, dim: int, dtype=None, device=None):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim, dtype=dtype, device=device)

    def forward(self, x, temb):
        scale, shift = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class NucleusImageTransformer(nn.Module):
    def __init__(self, config: NucleusImageConfig, parallel: ParallelState, dtype=torch.float32, device=None,
                 quant_config=None):
        super().__init__()
        c, kw = config, dict(dtype=dtype, device=device)
        self.config, self.parallel, self.dtype, self.quant_config = c, parallel, dtype, quant_config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.link = StageLink(parallel.pp)
        self.layer_ids = list(stage_layers(c.num_layers, parallel.pp.size, parallel.pp.rank))
        # Every stage modulates with the timestep and projects the text for its own blocks.
        self.time_text_embed = TimestepEmbedder(c.hidden_size, **kw)
        self.txt_norm = RMSNorm(c.joint_attention_dim, NORM_EPS, **kw)
        if self.link.is_first:
            self.img_in = nn.Linear(c.in_channels, c.hidden_size, **kw)
        self.transformer_blocks = nn.ModuleDict(
            {str(i): TransformerBlock(c, i, parallel, dtype, device, quant_config) for i in self.layer_ids})
        if self.link.is_last:
            self.norm_out = OutputNorm(c.hidden_size, **kw)
            self.proj_out = nn.Linear(c.hidden_size, c.patch_size ** 2 * c.output_channels, bias=False, **kw)

    def encode_text(self, text: torch.Tensor, key_mask: torch.Tensor | None, grid: tuple[int, int]) -> RequestCache:
        """text [B, L, joint_attention_dim] (the text encoder's hidden states, padded), key_mask
        [B, L] (None: no padding), grid: the image's (h, w) in tokens. This stage's text K/V and
        the image tokens' rotations (a step then copies nothing from the host: a CUDA graph holds it)."""
        text = self.txt_norm(text.to(self.device, self.dtype))
        freqs = rope_frequencies(self.config.axes_dims_rope, text_positions(*grid, text.shape[1]).to(self.device))
        blocks = {i: block.text_kv(text, freqs) for i, block in self.transformer_blocks.items()}
        image_freqs = local_chunk(rope_frequencies(self.config.axes_dims_rope, image_positions(*grid).to(self.device)),
                                  self.parallel.sp, dim=0)
        return RequestCache(blocks, None if key_mask is None else key_mask.to(self.device), image_freqs)

    def forward(self, latents: torch.Tensor, sigmas: torch.Tensor, grid: tuple[int, int], text: RequestCache,
                block_cache: FirstBlockCache | None = None):
        """One denoising step. latents [B, h·w, in_channels] (packed patches, whole on every rank),
        sigmas [B] in [0, 1], grid (h, w) in tokens; block_cache: the step's first-block cache, if
        the request runs one. Returns the model's output [B, h·w, p²·out] on every rank of every stage."""
        B, S, _ = latents.shape
        sp = self.parallel.sp
        if S % sp.size:
            raise ValueError(f"{S} image tokens cannot be split over sequence parallel size {sp.size}")
        local = S // sp.size
        temb = self.time_text_embed(sigmas.to(self.device))
        decided = block_cache.decide_ahead() if block_cache is not None and not self.link.is_first else None
        if self.link.is_first:
            x = self.img_in(local_chunk(latents.to(self.device, self.dtype), sp, dim=1))
        else:
            x = self.link.recv((B, local, self.config.hidden_size), self.dtype, self.device)
        blocks = [functools.partial(block, temb=temb, freqs=text.image_freqs, text=text.blocks[i],
                                    key_mask=text.key_mask)
                  for i, block in self.transformer_blocks.items()]
        x = run_blocks(x, blocks, block_cache, self.link.is_first, decided)
        out = None
        if self.link.is_last:
            out = gather_sequence(self.proj_out(self.norm_out(x, temb)), sp, dim=1)
        else:
            self.link.send(x)
        width = self.config.patch_size ** 2 * self.config.output_channels
        return self.link.broadcast_from_last(out, (B, S, width), self.dtype, self.device)
