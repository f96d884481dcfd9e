"""HunyuanImage-3.0's diffusion transformer, text-to-image path, on the parallel runtime.

Module paths follow the checkpoint (`model.wte`, `model.layers.{i}.self_attn.qkv_proj`,
`patch_embed.model.0`, `final_layer.model.1.2`, ...) except inside the generic MoE block and MLP,
whose names weights.py maps to the release's.

A denoising step runs its step tokens ([<timestep>], then <guidance> for a cfg-distilled model
and <timestep_r> for a mean-flow one, in the reference's order) and the image tokens [<img> x h·w]
against the text prefix's cached K/V (exact: text never attends to image tokens). Image hidden states are taken before `ln_f`, which
text-to-image never uses.

A model that writes text (the Instruct models' think and recaption passes; `text_head`) has `model.ln_f`
and `lm_head` on its last stage: `start_text` prefills a prompt and returns the next token's logits,
`decode` takes one token per row and returns the next logits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed.parallel_state import ParallelState
from ...distributed.pipeline_parallel import StageLink, stage_layers
from ...distributed.sequence_parallel import gather_sequence, local_chunk
from ...layers.mlp import SwiGLUMLP
from ...layers.norm import RMSNorm
from ...moe.layer import MoELayer, reset_token_counts
from ...sampling.step_cache import FirstBlockCache, run_blocks
from .attention import Attention, KVCache, TextCache
from .config import HunyuanImage3Config
from .tokenizer import CondImageSpans
from .rotary import rope_2d


def padding_mask(lengths: list[int], width: int, device) -> torch.Tensor | None:
    """[B, width], True at row b's first lengths[b] tokens (rows right-padded to width); None where
    no row is padded."""
    if min(lengths) >= width:
        return None
    return torch.arange(width, device=device)[None] < torch.tensor(lengths, device=device)[:, None]


@dataclass
class CondInputs:
    """One input image of an edit, for the first stage's prefill: where it sits, its clean latents
    (one per row: each row's image drew its own posterior sample) and its ViT tokens."""

    spans: CondImageSpans
    latents: torch.Tensor  # [B, C, h, w], scaled
    vit_tokens: torch.Tensor  # [1, slots, hidden], the aligner's output


class TimestepEmbedder(nn.Module):
    """t on a 0..1000 scale -> sinusoid [cos, sin] of width 256 -> Linear, GELU, Linear."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0,
                 dtype=None, device=None):
        super().__init__()
        self.frequency_size, self.max_period = frequency_size, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size, dtype=dtype, device=device), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size, dtype=dtype, device=device))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 (as the UNet blocks of the reference do)."""

    def __init__(self, channels: int, dtype=None, device=None):
        super().__init__(32, channels, dtype=dtype, device=device)

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def conv3x3(cin: int, cout: int, dtype=None, device=None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, dtype=dtype, device=device)


class ResBlock(nn.Module):
    """UNet residual block with scale-shift conditioning: GN(h)·(1 + scale) + shift."""

    def __init__(self, cin: int, cout: int, emb: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.in_layers = nn.Sequential(GroupNorm32(cin, **kw), nn.SiLU(), conv3x3(cin, cout, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * cout, **kw))
        self.out_layers = nn.Sequential(GroupNorm32(cout, **kw), nn.SiLU(), nn.Dropout(0.0), conv3x3(cout, cout, **kw))
        self.skip_connection = nn.Conv2d(cin, cout, 1, **kw) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[..., None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


class UNetDown(nn.Module):
    """patch_embed: latents [B, C, h, w] -> tokens [B, h·w, hidden] (patch size 1)."""

    def __init__(self, latent_channels: int, mid: int, hidden: int, dtype=None, device=None):
        super().__init__()
        self.model = nn.ModuleList([conv3x3(latent_channels, mid, dtype, device),
                                    ResBlock(mid, hidden, hidden, dtype, device)])

    def forward(self, latents, emb):
        h = self.model[1](self.model[0](latents), emb)
        return h.flatten(2).transpose(1, 2)


class UNetUp(nn.Module):
    """final_layer: tokens [B, h·w, hidden] -> velocity [B, C, h, w]."""

    def __init__(self, hidden: int, mid: int, latent_channels: int, dtype=None, device=None):
        super().__init__()
        self.model = nn.ModuleList([ResBlock(hidden, mid, hidden, dtype, device),
                                    nn.Sequential(GroupNorm32(mid, dtype, device), nn.SiLU(),
                                                  conv3x3(mid, latent_channels, dtype, device))])

    def forward(self, tokens, emb, grid):
        h = tokens.unflatten(1, grid).permute(0, 3, 1, 2)  # [B, hidden, h, w], channels-last strides
        return self.model[1](self.model[0](h, emb))


class DecoderLayer(nn.Module):
    def __init__(self, config: HunyuanImage3Config, index: int, parallel: ParallelState, dtype, device,
                 quant_config=None):
        super().__init__()
        c, kw = config, dict(dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   parallel.tp, parallel.sp, c.rms_norm_eps, quant_config=quant_config,
                                   step_tokens=c.num_step_tokens, **kw)
        if c.is_moe_layer(index):
            self.mlp = MoELayer(c.hidden_size, c.num_experts, c.moe_topk[index], c.mlp_width(index),
                                parallel, shared_intermediate_size=c.shared_intermediate_size(index),
                                **c.router_options(index), quant_config=quant_config, **kw)
        else:
            self.mlp = SwiGLUMLP(c.hidden_size, c.mlp_width(index), parallel.tp, quant_config=quant_config, **kw)

    def prefill(self, x, cos, sin, mask=None):
        attn, cache = self.self_attn.prefill(self.input_layernorm(x), cos, sin, mask)
        h, x = self.post_attention_layernorm(attn, residual=x)
        return x + self.mlp(h), cache

    def forward(self, x, cos, sin, cache):
        h, x = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache), residual=x)
        return x + self.mlp(h)

    def decode(self, x, cos, sin, cache: TextCache, slots, visible):
        attn = self.self_attn.decode(self.input_layernorm(x), cos, sin, cache, slots, visible)
        h, x = self.post_attention_layernorm(attn, residual=x)
        return x + self.mlp(h)


class Backbone(nn.Module):
    """The `model.` part of the checkpoint: embeddings and this stage's decoder layers."""

    def __init__(self, config, parallel, layer_ids, first_stage: bool, dtype, device, quant_config=None,
                 final_norm: bool = False):
        super().__init__()
        if first_stage:
            self.wte = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, parallel, dtype, device, quant_config)
                                     for i in layer_ids})
        if final_norm:  # the text head's (image tokens are read before it)
            self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)


class HunyuanImage3Transformer(nn.Module):
    def __init__(self, config: HunyuanImage3Config, parallel: ParallelState, dtype=torch.float32, device=None,
                 quant_config=None, text_head: bool = False):
        """quant_config: from epdiff.quantization (None: every weight in dtype); the layers with a
        quantized form (the routed experts) take it. text_head: build ln_f and lm_head (on the last
        stage) to write text."""
        super().__init__()
        c, kw = config, dict(dtype=dtype, device=device)
        self.config, self.parallel, self.dtype = c, parallel, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.link = StageLink(parallel.pp)
        self.layer_ids = list(stage_layers(c.num_hidden_layers, parallel.pp.size, parallel.pp.rank))
        self.quant_config = quant_config
        self.model = Backbone(c, parallel, self.layer_ids, self.link.is_first, dtype, device, quant_config,
                              final_norm=text_head and self.link.is_last)
        if text_head and self.link.is_last:  # replicated: every last-stage rank can read the logits
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)
        # The UNet convolutions keep channels-last weights: cuDNN then runs Hopper NHWC kernels, and
        # the image's [B, C, h, w] <-> [B, h·w, C] token views need no transposing copies.
        if self.link.is_first:
            self.timestep_emb = TimestepEmbedder(c.hidden_size, **kw)
            if c.cfg_distilled:  # the guidance scale × 1000, a token of its own
                self.guidance_emb = TimestepEmbedder(c.hidden_size, **kw)
            if c.use_meanflow:  # the end of the step, a token of its own
                self.timestep_r_emb = TimestepEmbedder(c.hidden_size, **kw)
            self.time_embed = TimestepEmbedder(c.hidden_size, **kw)
            self.patch_embed = UNetDown(c.latent_channels, c.patch_embed_hidden_dim, c.hidden_size,
                                        **kw).to(memory_format=torch.channels_last)
        if self.link.is_last:
            self.time_embed_2 = TimestepEmbedder(c.hidden_size, **kw)
            self.final_layer = UNetUp(c.hidden_size, c.patch_embed_hidden_dim, c.latent_channels,
                                      **kw).to(memory_format=torch.channels_last)

    def _rope(self, positions):
        """positions [L, 2] (shared by the batch) or [B, L, 2] -> cos, sin [1 or B, L, head_dim]."""
        cos, sin = rope_2d(positions.to(self.device), self.config.head_dim, self.config.rope_theta)
        return (cos[None], sin[None]) if positions.dim() == 2 else (cos, sin)

    def _receive_or(self, make, shape):
        return make() if self.link.is_first else self.link.recv(shape, self.dtype, self.device)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor,
                lengths: list[int] | None = None, cond: list[CondInputs] | None = None,
                blocks: list[slice] = ()) -> list[KVCache]:
        """The text prefix (everything before <timestep>): input_ids [B, Lp], positions [Lp, 2]
        or, for prompts of different lengths, [B, Lp, 2] with each row right-padded to Lp and
        lengths[b] its real tokens. (Causal attention keeps the padding out of every real token;
        the caches' key masks keep it out of every later step.) No inference_mode here, so the
        model trains; the pipeline runs it under inference_mode. Returns this stage's per-layer
        K/V, reused on every denoising step.

        A prefill and the steps after it each have a token layout of their own: the MoE layers
        exchange their token counts once for each (dispatch.TokenCounts).

        cond: an edit's input images (the first stage's: their tokens are written over the
        embeddings); blocks: the prefix's runs that attend both ways (every stage's; the rows'
        layouts the same)."""
        x, caches = self._run_prefix(input_ids, positions, lengths, cond, blocks)
        return caches

    def _run_prefix(self, input_ids, positions, lengths, cond, blocks):
        """The prefill's layers: (the last stage's hidden states, or None; this stage's caches)."""
        reset_token_counts(self)
        B, L = input_ids.shape
        x = self._receive_or(lambda: self._embed_prefix(input_ids, cond), (B, L, self.config.hidden_size))
        cos, sin = self._rope(positions)
        key_mask = padding_mask(lengths, L, self.device) if lengths is not None else None
        mask = None
        if blocks:
            if key_mask is not None:
                raise ValueError("input images need every row of the batch to have one length")
            mask = torch.ones(L, L, dtype=torch.bool, device=self.device).tril()
            for run in blocks:
                mask[run, run] = True
            mask = mask[None]
        caches = []
        for layer in self.model.layers.values():
            x, cache = layer.prefill(x, cos, sin, mask)
            cache.key_mask = key_mask
            caches.append(cache)
        if not self.link.is_last:
            self.link.send(x)
            x = None
        reset_token_counts(self)
        return x, caches

    def start_text(self, input_ids: torch.Tensor, positions: torch.Tensor, lengths: list[int], capacity: int,
                   cond: list[CondInputs] | None = None, blocks: list[slice] = ()
                   ) -> tuple[torch.Tensor | None, list[TextCache]]:
        """A text pass's prefill: input_ids [B, Lp] right-padded, positions [B, Lp, 2] (or [Lp, 2]),
        lengths[b] row b's real tokens. Returns the logits of each row's next token [B, vocab] (fp32,
        on the last stage; None elsewhere) and this stage's caches, with room for capacity tokens a
        row. The MoE layers' token counts are reset for the one-token steps that follow."""
        x, caches = self._run_prefix(input_ids, positions, lengths, cond, blocks)
        logits = None
        if x is not None:
            last = torch.tensor(lengths, device=self.device) - 1
            logits = self._logits(x[torch.arange(len(lengths), device=self.device), last])
        return logits, [TextCache.of(cache, capacity) for cache in caches]

    def decode(self, token_ids: torch.Tensor, slots: torch.Tensor, caches: list[TextCache]) -> torch.Tensor | None:
        """One written token per row: token_ids [B] at sequence index slots[b] (its cache slot and its
        1-D position; both on the device, so the step's shapes and host work never change). Returns
        the next logits [B, vocab] (fp32) on the last stage, None elsewhere."""
        B, hidden = slots.shape[0], self.config.hidden_size
        x = self._receive_or(lambda: self.model.wte(token_ids[:, None]), (B, 1, hidden))
        cos, sin = self._rope(slots[:, None, None].expand(B, 1, 2))
        capacity = caches[0].k.shape[1] if caches else 0
        visible = torch.arange(capacity, device=self.device)[None] <= slots[:, None]
        for layer, cache in zip(self.model.layers.values(), caches):
            x = layer.decode(x, cos, sin, cache, slots, visible)
        if not self.link.is_last:
            self.link.send(x)
            return None
        return self._logits(x[:, 0])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.ln_f(hidden)).float()

    def _embed_prefix(self, input_ids: torch.Tensor, cond: list[CondInputs] | None) -> torch.Tensor:
        x = self.model.wte(input_ids.to(self.device))
        for image in cond or []:
            B = x.shape[0]
            zero = torch.zeros(B, device=self.device)
            x[:, image.spans.timestep] = self.timestep_emb(zero).to(x.dtype)
            latents = image.latents.to(self.device, self.dtype)
            x[:, image.spans.vae] = self.patch_embed(latents, self.time_embed(zero)).to(x.dtype)
            x[:, image.spans.vit] = image.vit_tokens.to(self.device, x.dtype).expand(B, -1, -1)
        return x

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, positions: torch.Tensor,
                caches: list[KVCache], block_cache: FirstBlockCache | None = None,
                guidance: torch.Tensor | None = None, timesteps_r: torch.Tensor | None = None) -> torch.Tensor:
        """One denoising step. latents [B, C, h, w] (whole image on every rank), timesteps [B] on
        the 0..1000 scale, positions [n + h·w, 2] of the n step tokens and the image tokens
        ([B, n + h·w, 2] when the batch's prompts differ in length). guidance [B] (cfg-distilled:
        the scale × 1000) and timesteps_r [B] (mean flow: the step's end on the 0..1000 scale) are
        the models' that have those tokens, and required there.
        block_cache: the step's first-block cache, if the request runs one (sampling/step_cache.py).
        Returns the velocity [B, C, h, w] on every rank of every stage."""
        B, C, h, w = latents.shape
        sp, n = self.parallel.sp, self.config.num_step_tokens
        if (h * w) % sp.size:
            raise ValueError(f"{h}×{w} = {h * w} image tokens cannot be split over sequence parallel size {sp.size}")
        local = n + h * w // sp.size
        latents, timesteps = latents.to(self.device, self.dtype), timesteps.to(self.device)

        def embed():
            image = self.patch_embed(latents, self.time_embed(timesteps))
            tokens = [self.timestep_emb(timesteps)[:, None]]
            if self.config.cfg_distilled:
                tokens.append(self.guidance_emb(guidance.to(self.device))[:, None])
            if self.config.use_meanflow:
                tokens.append(self.timestep_r_emb(timesteps_r.to(self.device))[:, None])
            return torch.cat([*tokens, local_chunk(image, sp, dim=1)], dim=1)

        decided = block_cache.decide_ahead() if block_cache is not None and not self.link.is_first else None
        x = self._receive_or(embed, (B, local, self.config.hidden_size))
        rope_positions = torch.cat([positions[..., :n, :], local_chunk(positions[..., n:, :], sp, dim=-2)], dim=-2)
        cos, sin = self._rope(rope_positions)
        blocks = [functools.partial(layer, cos=cos, sin=sin, cache=cache)
                  for layer, cache in zip(self.model.layers.values(), caches)]
        x = run_blocks(x, blocks, block_cache, self.link.is_first, decided)
        velocity = None
        if self.link.is_last:
            image = gather_sequence(x[:, n:], sp, dim=1)
            velocity = self.final_layer(image, self.time_embed_2(timesteps), (h, w))
        else:
            self.link.send(x)
        return self.link.broadcast_from_last(velocity, (B, C, h, w), self.dtype, self.device)
