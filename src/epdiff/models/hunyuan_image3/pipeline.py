"""Text to image (and, for the Instruct models, editing) with HunyuanImage-3.0 on one rank of any
parallel layout: the family's part of the engine's denoising loop (models/base.py).

A batch tokenizes each prompt's conditional and unconditional sequences, caches the prefix's K/V
(text, and an edit's input images: conditioning.py) for this rank's guidance branches, and draws
each image's noise as the reference does; each step then runs [step tokens, image tokens] of every
branch against the cache. The decode ranks turn final latents into images with the checkpoint's VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...distributed.parallel_state import ParallelState
from ...loader.safetensors_loader import SafetensorsCheckpoint
from ...sampling.scheduler import FlowMatchScheduler
from ...kernels.graphs import CudaGraphStep, CudaGraphsByShape
from ..base import DenoisingBatch, ImagePipeline, TextBatch
from .attention import KVCache, TextCache
from .conditioning import ImageConditioner
from .loading import load_model
from .model import CondInputs, padding_mask
from .vae import AutoencoderKLConv3D, reference_autocast, to_uint8
from .weights import load_vae


# A new prompt's prefill is ~1,100 kernel launches at 20 layers and its host time twice its GPU
# time (BENCHMARKS §23). On one GPU a text prefix is right-padded to a multiple of PREFILL_BUCKET
# tokens and replayed as a CUDA graph, one per (rows, padded length), the PREFILL_GRAPHS most
# recently used kept: causal attention keeps the padding out of every real token, and the caches
# keep the real tokens only.
PREFILL_BUCKET = 64
PREFILL_GRAPHS = 8


def initial_noise(seed: int, shape, device: torch.device, cond_shapes: Sequence[tuple] = ()):
    """The reference's draws, one generator per image on the run's device (so a seed gives the
    reference's image alone or in any batch, on every rank): first each input image's posterior
    noise (fp32, [1, C, h, w] each), then the initial noise in bf16 [1, *shape]."""
    g = torch.Generator(device=device).manual_seed(seed)
    cond = [torch.randn((1, *s), generator=g, dtype=torch.float32, device=device) for s in cond_shapes]
    return torch.randn((1, *shape), generator=g, dtype=torch.bfloat16, device=device), cond


class HunyuanImage3Pipeline(ImagePipeline):
    def __init__(self, info, parallel: ParallelState, dtype: torch.dtype, load_format: str = "safetensors",
                 quantization: str | None = None, decode: bool = True, text_head: bool = False):
        """info: the folder's HunyuanImage3Info. decode: load the VAE here. text_head: load ln_f and
        lm_head (the Instruct models' text passes)."""
        self.info, self.parallel, self.device, self.dtype = info, parallel, parallel.device, dtype
        self.config, self.tokenizer = info.config, info.tokenizer
        self.transformer, checkpoint = load_model(info.model_dir, parallel, dtype, self.device, load_format,
                                                  self.config, quantization, text_head)
        self.checkpoint_bytes_read = checkpoint.bytes_read if checkpoint else 0
        self.vae = self._load_vae(checkpoint) if decode else None
        self.can_decode = self.vae is not None
        self.conditioner = None
        self._prefill_graphs = CudaGraphsByShape(self._prefill_as_tuples, PREFILL_GRAPHS)
        if info.supports_images:  # every rank lays the input images out; the first stage embeds them
            first = self.transformer.link.is_first
            encoder = self._load_vae(checkpoint, encoder=True) if first else None
            self.conditioner = ImageConditioner(self.config, info.resolution, encoder, self.device, dtype)
            if first:
                self.conditioner.load(checkpoint)

    def _load_vae(self, ckpt: SafetensorsCheckpoint | None, encoder: bool = False) -> AutoencoderKLConv3D:
        """The decoder (encoder=False) or the encoder alone, fp32."""
        if ckpt is None:  # --load-format dummy
            return AutoencoderKLConv3D(self.config.vae, with_encoder=encoder,
                                       with_decoder=not encoder).to(self.device).eval()
        return load_vae(ckpt, self.config.vae, self.device, with_encoder=encoder, with_decoder=not encoder)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [int(i) for i, layer in self.transformer.model.layers.items() if self.config.is_moe_layer(int(i))]

    def start_batch(self, tasks, branches, block_cache=None) -> DenoisingBatch:
        first, c = tasks[0], self.config
        ratio = self.info.resolution.ratio_index(first.height, first.width)
        h, w = first.height // c.vae_factor, first.width // c.vae_factor
        # An edit's input images: a batch holds one request's images (the planner's batch key).
        prepared = [self.conditioner.prepare(image) for image in first.images] if first.images else []
        layouts = [p.layout for p in prepared]
        sequences = {}  # (prompt, system prompt, written text) -> (cond, uncond)
        for task in tasks:
            key = task.prompt, task.system_prompt, task.cot_text
            if key not in sequences:
                ids, template = self.tokenizer.encode(task.prompt), self.info.template(task.system_prompt, task.cot_text)
                build = (self.tokenizer.build_sequence, self.tokenizer.build_uncond_sequence)
                sequences[key] = tuple(make(ids, ratio, h, w, c.image_base_size, self.info.context, template,
                                            layouts) for make in build)
        # Rows: every image of the first branch, then every image of the second ([cond; uncond]).
        rows = [sequences[task.prompt, task.system_prompt, task.cot_text][branch] for branch in branches
                for task in tasks]
        draws = [initial_noise(task.seed, (c.latent_channels, h, w), self.device,
                               [(c.latent_channels, *layout.vae_grid) for layout in layouts]) for task in tasks]
        latents = torch.cat([noise for noise, _ in draws])
        cond = self._cond_inputs(prepared, [posterior for _, posterior in draws], rows[0].cond, len(branches))
        caches, gen_positions = self._prefill(rows, cond)
        scheduler = FlowMatchScheduler(first.num_inference_steps, float(self.info.generation.flow_shift),
                                       first.solver)
        timesteps, timesteps_r = scheduler.timesteps.to(self.device), scheduler.timesteps_r.to(self.device)
        guidance = None
        if c.cfg_distilled:  # the reference's value: the scale × 1000 rounded to bf16 (2.5 -> 2496)
            scale = torch.tensor(1000.0 * first.guidance_scale, dtype=torch.bfloat16).float()
            guidance = scale.expand(len(rows)).to(self.device)

        # Eager: as a CUDA graph a 1024² step ran no faster on an H100 (BENCHMARKS §20), and the graph
        # would keep a step's intermediate tensors besides the cache.
        def predict(latents: torch.Tensor, i: int) -> torch.Tensor:
            t = timesteps[i].expand(len(rows))
            r = timesteps_r[i].expand(len(rows)) if c.use_meanflow else None
            return self.transformer(latents.repeat(len(branches), 1, 1, 1), t, gen_positions, caches,
                                    block_cache, guidance=guidance, timesteps_r=r).float()

        return DenoisingBatch(latents, scheduler, predict)

    def _cond_inputs(self, prepared, posteriors, spans, repeat: int) -> list[CondInputs] | None:
        """The first stage's input-image embeddings (posteriors[row][k]: row's draw for image k)."""
        if not prepared or not self.transformer.link.is_first:
            return None
        cond = []
        for k, image in enumerate(prepared):
            clean = self.conditioner.vae_latents(image, [posterior[k] for posterior in posteriors])
            cond.append(CondInputs(spans[k], clean.repeat(repeat, 1, 1, 1), self.conditioner.vit_tokens(image)))
        return cond

    def start_text(self, tasks, steps: int) -> TextBatch:
        """The text passes' prefill (one row a task, right-padded; an edit's rows share its input
        images, the planner's batch key), with room for `steps` written tokens a row. An input
        image's posterior noise is the image's own seed's first draw, as its image pass draws it.
        Rows without input images may join the pass later (TextBatch.join), an edit's pass too: after
        its prefill a row's cache is its own, and each row sees its own slots."""
        logits, caches, lengths = self._text_prefill(tasks, steps)
        rows = _TextRows(caches, torch.tensor(lengths, device=self.device))  # slots: each row's next token's

        def step(tokens: torch.Tensor) -> torch.Tensor | None:
            logits = self.transformer.decode(tokens, rows.slots, rows.caches)
            # A row that has ended keeps stepping while others write: it stays at its last slot.
            torch.clamp(rows.slots + 1, max=rows.caches[0].capacity - 1 if rows.caches else 0, out=rows.slots)
            return logits

        # One GPU: the one-token step as a CUDA graph (launches were most of its time: BENCHMARKS
        # §19); eager under collectives, on a CPU, with --enforce-eager, or where the experts
        # take their per-expert loop (it reads their row counts on the host).
        graphed = self.replays_graphs()
        rows.step = CudaGraphStep(step, graphed)

        def join(joining, steps: int) -> torch.Tensor | None:
            capacity = rows.caches[0].capacity if rows.caches else 0
            logits, caches, lengths = self._text_prefill(joining, steps, capacity)
            rows.caches = [mine.joined(new) for mine, new in zip(rows.caches, caches)]
            rows.slots = torch.cat([rows.slots, torch.tensor(lengths, device=self.device)])
            rows.step = CudaGraphStep(step, graphed)  # new shapes: captured again
            return logits

        def compact(keep) -> None:
            index = torch.tensor(list(keep), dtype=torch.long, device=self.device)
            rows.caches = [TextCache(cache.k[index], cache.v[index]) for cache in rows.caches]
            rows.slots = rows.slots[index]
            rows.step = CudaGraphStep(step, graphed)

        return TextBatch(logits, lambda tokens: rows.step(tokens), join, compact)

    def _text_prefill(self, tasks, steps: int, capacity: int = 0):
        """(next-token logits, this stage's caches, each row's length) of the tasks' text prefixes,
        with room for `steps` tokens a row (at least `capacity` in all)."""
        first, c = tasks[0], self.config
        prepared = [self.conditioner.prepare(image) for image in first.images] if first.images else []
        layouts = [p.layout for p in prepared]
        rows = [self.tokenizer.build_text_sequence(task.prompt, task.task, self.info.template(task.system_prompt),
                                                   c.image_base_size, layouts) for task in tasks]
        lengths = [len(row) for row in rows]
        prefix, positions = self._right_padded(rows, lengths)
        posteriors = [initial_noise(task.seed, (1, 1, 1), self.device,
                                    [(c.latent_channels, *layout.vae_grid) for layout in layouts])[1] for task in tasks]
        cond = self._cond_inputs(prepared, posteriors, rows[0].cond, 1)
        logits, caches = self.transformer.start_text(prefix, positions, lengths, max(capacity, max(lengths) + steps),
                                                     cond, rows[0].bidirectional_blocks)
        return logits, caches, lengths

    def _prefill(self, rows, cond=None):
        """Caches the prefix of every row; returns the caches and the positions of each step's
        step tokens and image tokens (shared when every row's prompt has one length)."""
        lengths = [seq.timestep_index for seq in rows]
        longest, first = max(lengths), rows[0]
        one_length = longest == min(lengths)
        if one_length:
            gen = first.positions[longest: first.image_start + first.image_len]
        else:
            gen = torch.stack([seq.positions[seq.timestep_index: seq.image_start + seq.image_len] for seq in rows])
        if cond is None and not first.bidirectional_blocks and self.replays_graphs():
            caches = self._bucketed_prefill(rows, lengths)
        elif one_length:
            prefix = torch.stack([seq.input_ids[:longest] for seq in rows])
            caches = self.transformer.prefill(prefix, first.positions[:longest], cond=cond,
                                              blocks=first.bidirectional_blocks)
        else:
            prefix, positions = self._right_padded(rows, lengths)
            caches = self.transformer.prefill(prefix, positions, lengths)
        return caches, gen.to(self.device)

    def _bucketed_prefill(self, rows, lengths: list[int]) -> list[KVCache]:
        """The text prefixes right-padded to a multiple of PREFILL_BUCKET and prefilled by a
        captured graph for that shape; the caches are copies of the real tokens' K/V (the graph's
        own buffers are overwritten by its next replay)."""
        longest = max(lengths)
        prefix, positions = self._right_padded(rows, lengths, -(-longest // PREFILL_BUCKET) * PREFILL_BUCKET)
        padded = self._prefill_graphs(prefix.to(self.device), positions.to(self.device))
        key_mask = padding_mask(lengths, longest, self.device)
        return [KVCache(k[:, :longest].clone(), v[:, :longest].clone(), key_mask) for k, v in padded]

    def _prefill_as_tuples(self, prefix: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(cache.k, cache.v) for cache in self.transformer.prefill(prefix, positions)]

    def _right_padded(self, rows, lengths: list[int], width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows' first lengths[r] ids and positions, right-padded to the longest (or to width):
        [B, L] and [B, L, 2]."""
        pad = self.tokenizer.pad if self.tokenizer.pad is not None else self.tokenizer.bos
        width = max(width, *lengths)
        prefix = torch.full((len(rows), width), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), width, 2), dtype=torch.long)
        for r, row in enumerate(rows):
            prefix[r, :lengths[r]] = row.input_ids[:lengths[r]]
            positions[r, :lengths[r]] = row.positions[:lengths[r]]
        return prefix, positions

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with reference_autocast(self.device):
            images = self.vae.decode_latents(latents.to(self.device, next(self.vae.parameters()).dtype))
        return to_uint8(images.float()).cpu()


@dataclass
class _TextRows:
    """A text pass's state on this rank: its caches (this stage's layers), each row's next slot,
    and the step (captured again when rows join)."""

    caches: list
    slots: torch.Tensor
    step: CudaGraphStep | None = None
