"""`epdiff train-tiny`: train a small HunyuanImage-3.0 that draws the shapes data set.

Two stages, one process (GPU if present, slowly on CPU):
1. the VAE (a small AutoencoderKLConv3D config): reconstruction + a light KL term; its latent
   scale is then measured and stored as `scaling_factor`, as the release does;
2. the MoE transformer (the release architecture at a small size), flow matching on those
   latents: x_σ = (1 − σ)·x0 + σ·noise, target v = noise − x0, σ logit-normal, the prompt dropped
   to <cfg> tokens for 10 % of samples (what guidance needs), plus a small load-balancing loss so
   that every expert is used. Weights are averaged (EMA) and written in the release format.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...distributed.parallel_state import ParallelState
from ...loader.dummy import init_dummy_weights
from ...loader.safetensors_loader import SafetensorsCheckpoint
from ...moe.router import Router
from ...train import shapes
from .config import HunyuanImage3Config
from .loading import load_model
from .make_tiny import save_release_format, tiny_config
from .model import HunyuanImage3Transformer
from .resolution import snap
from .tiny_tokenizer import build_tiny_tokenizer
from .tokenizer import HunyuanTokenizer
from .vae import AutoencoderKLConv3D, vae_config_tiny
from .weights import load_vae

IMAGE_SIZE = 128
MODEL_SIZE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, num_experts=8,
                  moe_topk=2, moe_intermediate_size=128, image_base_size=IMAGE_SIZE, patch_embed_hidden_dim=64)
VAE_SIZE = dict(block_out_channels=(32, 32, 32, 32, 64), latent_channels=16, layers_per_block=1, ffactor_temporal=1)
GENERATION = {"diff_infer_steps": 30, "diff_guidance_scale": 4.0, "flow_shift": 1.0}


class ImagePool:
    """Jittered renders made once (PIL drawing per step would dominate a GPU step), uint8 on the
    training device, with their scenes; batches are drawn from it.

    one_object_share: the fraction of images that hold one object (None: scenes drawn uniformly,
    which makes it 126 / 1746 = 7 %, too few for the model to learn that a one-object prompt
    means nothing else in the picture). partial_caption_share: the fraction of one-object images
    captioned without their size, their position or both (a third each), so that the model draws
    the shape for a prompt that leaves them out ("a small green triangle")."""

    def __init__(self, scenes, size: int, rng: random.Random, device, one_object_share: float | None = None,
                 partial_caption_share: float = 0.0):
        if one_object_share is None:
            self.scenes = [rng.choice(scenes) for _ in range(size)]
        else:
            if not 0 <= one_object_share <= 1:
                raise ValueError(f"one_object_share={one_object_share}: give a fraction in [0, 1]")
            ones = [s for s in scenes if len(s.objects) == 1]
            twos = [s for s in scenes if len(s.objects) == 2]
            self.scenes = [rng.choice(ones if rng.random() < one_object_share else twos) for _ in range(size)]
        if not 0 <= partial_caption_share <= 1:
            raise ValueError(f"partial_caption_share={partial_caption_share}: give a fraction in [0, 1]")
        self.captions = [shapes.caption(s) for s in self.scenes]
        for i, scene in enumerate(self.scenes):
            # (no draw at all at share 0: the pool's renders stay those of earlier trainings)
            if partial_caption_share and len(scene.objects) == 1 and rng.random() < partial_caption_share:
                say_size, say_position = rng.choice([(False, True), (True, False), (False, False)])
                self.captions[i] = shapes.caption(shapes.partial(scene, say_size, say_position))
        pixels = [torch.frombuffer(bytearray(shapes.render(s, IMAGE_SIZE, rng=rng).tobytes()), dtype=torch.uint8)
                  for s in self.scenes]
        self.images = torch.stack(pixels).view(size, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).to(device)

    def __len__(self):
        return len(self.scenes)

    def batch(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, device=self.images.device)].float() / 127.5 - 1.0


def train_vae(config: dict, steps: int, batch: int, device, pool: ImagePool, rng, log) -> AutoencoderKLConv3D:
    vae = AutoencoderKLConv3D(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        images = pool.batch([rng.randrange(len(pool)) for _ in range(batch)])
        mean, logvar = vae.encode_moments(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        recon = vae.decode(z[:, :, None])[:, :, -1]
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = F.mse_loss(recon, images) + 0.1 * F.l1_loss(recon, images) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps}  loss {loss.item():.4f}  kl {kl.item():.3f}")
    with torch.no_grad():  # the release scales latents to about unit variance
        images = pool.batch(range(min(4 * batch, 64, len(pool))))
        std = vae.encode_moments(images)[0].std().item()
    vae.config["scaling_factor"] = vae.scaling_factor = 1.0 / max(std, 1e-6)
    return vae.eval()


@torch.no_grad()
def encode_pool(vae, pool: ImagePool, batch: int = 64) -> torch.Tensor:
    """Posterior means of every pool image, in the diffusion model's latent space."""
    return torch.cat([vae.encode(pool.batch(range(i, min(i + batch, len(pool)))), sample_posterior=False)
                      for i in range(0, len(pool), batch)])


@dataclass
class PromptGroup:
    """Pool images whose prompts have one length (a batch shares its positions), with the cond
    and uncond prefixes of each, tokenized once."""
    members: torch.Tensor  # [n] pool indices
    cond: torch.Tensor  # [n, prefix] token ids before <timestep>
    uncond: torch.Tensor
    positions: torch.Tensor  # [prefix + 1 + image tokens, 2]


def prompt_groups(pool: ImagePool, tokenizer, ratio: int, grid, base_size: int, device) -> list[PromptGroup]:
    by_caption, by_length = {}, {}
    for i, text in enumerate(pool.captions):
        if text not in by_caption:
            ids = tokenizer.encode(text)
            by_caption[text] = (tokenizer.build_sequence(ids, ratio, *grid, base_size),
                                tokenizer.build_uncond_sequence(ids, ratio, *grid, base_size))
        by_length.setdefault(by_caption[text][0].timestep_index, []).append((i, *by_caption[text]))
    groups = []
    for ts, items in by_length.items():
        seq = items[0][1]
        groups.append(PromptGroup(torch.tensor([i for i, _, _ in items], device=device),
                                  torch.stack([c.input_ids[:ts] for _, c, _ in items]).to(device),
                                  torch.stack([u.input_ids[:ts] for _, _, u in items]).to(device),
                                  seq.positions[: seq.image_start + seq.image_len].to(device)))
    return groups


def load_balance_loss(model) -> tuple[list, callable]:
    """Switch-style E·Σ_e f_e·P_e per MoE layer, from hooks on the routers."""
    terms = []

    def hook(router, args, output):
        ids, _ = output
        x = args[0].reshape(-1, args[0].shape[-1])  # the router takes [..., D]
        probs = (x.float() @ router.weight.float().t()).softmax(-1)
        chosen = torch.zeros_like(probs).scatter_(1, ids, 1.0)
        terms.append(router.num_experts * (chosen.mean(0) * probs.mean(0)).sum() / router.top_k)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]
    return terms, handles


def train_transformer(config: HunyuanImage3Config, latents: torch.Tensor, pool: ImagePool, tokenizer, steps: int,
                      batch: int, device, rng, log, lr: float = 3e-4, deadline: float | None = None,
                      init_from: str | None = None):
    """Flow-matching training for `steps` steps or, with a deadline (a time.time() value), until
    then if that comes first. The cosine schedule follows the larger of the step share and the
    elapsed share of the time left at the start: when several runs share one GPU their step rate
    changes as the others start and stop, so a step count fitted once from the first steps would
    miss the deadline or waste the end of it. init_from: a checkpoint of this config to continue
    from (else random weights). Returns (EMA model, steps taken, seconds per step)."""
    if init_from:
        model, _ = load_model(init_from, ParallelState.single(device), torch.float32, device, config=config)
    else:
        model = HunyuanImage3Transformer(config, ParallelState.single(device), device=device)
        init_dummy_weights(model, seed=rng.randrange(2**31))
    ema = copy.deepcopy(model).requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    ratio, height, width = snap(IMAGE_SIZE, IMAGE_SIZE, config.image_base_size, config.vae_factor)
    grid = (height // config.vae_factor, width // config.vae_factor)
    balance_terms, _ = load_balance_loss(model)
    groups = prompt_groups(pool, tokenizer, ratio, grid, config.image_base_size, device)
    weights = [len(g.members) for g in groups]
    warmup = max(1, min(steps // 20, 200))
    start = time.time()
    budget = None if deadline is None else max(deadline - start, 1e-3)
    step, progress, next_log = 0, 0.0, 0.0
    while step < steps and progress < 1:
        group = rng.choices(groups, weights=weights)[0]
        chosen = torch.randint(len(group.members), (batch,), device=device)
        x0 = latents[group.members[chosen]]
        dropped = torch.rand(batch, device=device) < 0.1  # the prompt becomes <cfg> tokens
        prefix = torch.where(dropped[:, None], group.uncond[chosen], group.cond[chosen])
        ts = prefix.shape[1]
        sigma = torch.sigmoid(torch.randn(batch, device=device))
        noise = torch.randn_like(x0)
        x_sigma = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        balance_terms.clear()
        caches = model.prefill(prefix, group.positions[:ts])
        v = model(x_sigma, sigma * 1000, group.positions[ts:], caches)
        flow = F.mse_loss(v.float(), noise - x0)
        balance = torch.stack(balance_terms).mean()
        loss = flow + 0.01 * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - min(0.999, (1 + step) / (10 + step)))
        step += 1
        progress = step / steps if budget is None else max(step / steps, (time.time() - start) / budget)
        if progress >= next_log or step == 1 or not (step < steps and progress < 1):  # first, every 5 %, last
            log(f"transformer step {step:6d} ({progress:4.0%})  flow loss {flow.item():.4f}  "
                f"balance {balance.item():.3f}  {(time.time() - start) / step * 1e3:.1f} ms per step")
            next_log = progress + 0.05
    sync(device)
    return ema.eval(), step, (time.time() - start) / max(step, 1)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_tiny(out_dir: str, vae_steps: int = 2000, transformer_steps: int = 8000, vae_batch: int = 32,
               batch: int = 128, device: str | None = None, seed: int = 0, log=print, pool_size: int = 32768,
               lr: float = 6e-4, model_size: dict | None = None, max_minutes: float | None = None,
               init_from: str | None = None, vae_from: str | None = None,
               one_object_share: float | None = 0.15, partial_caption_share: float = 0.0) -> str:
    """Train and write the shapes model. model_size overrides MODEL_SIZE's keys; max_minutes caps
    the whole run (the transformer stage takes as many steps as fit, up to transformer_steps).
    init_from: a trained shapes model whose VAE is kept (no VAE training) and whose transformer
    training continues (its size wins over model_size). vae_from: a trained shapes model whose
    VAE is kept, with a new transformer of model_size. one_object_share, partial_caption_share:
    see ImagePool."""
    if init_from and vae_from:
        raise ValueError(f"give init_from ({init_from!r}) or vae_from ({vae_from!r}), not both")
    start = time.time()
    deadline = None if max_minutes is None else start + 60 * max_minutes - 30  # 30 s to write the files
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rng = random.Random(seed)
    torch.manual_seed(seed)
    train, _ = shapes.split_scenes()
    build_tiny_tokenizer(out_dir, IMAGE_SIZE)  # tokenizer.json and tokenizer_config.json
    tokenizer = HunyuanTokenizer.from_pretrained(out_dir)
    pool = ImagePool(train, pool_size, rng, device, one_object_share, partial_caption_share)
    log(f"rendered {len(pool)} training images ({sum(len(s.objects) == 1 for s in pool.scenes)} of one object) "
        f"in {time.time() - start:.0f} s")
    size = {**MODEL_SIZE, **(model_size or {})}
    if init_from or vae_from:
        with open(os.path.join(init_from or vae_from, "config.json")) as f:
            cfg = json.load(f)
        vae = load_vae(SafetensorsCheckpoint(init_from or vae_from), cfg["vae"], device, with_encoder=True)
        vae_steps = 0
        if vae_from:
            cfg = tiny_config(vocab_size=tokenizer.vocab_size, vae=cfg["vae"], **size)
    else:
        vae = train_vae(vae_config_tiny(**VAE_SIZE), vae_steps, vae_batch, device, pool, rng, log)
        cfg = tiny_config(vocab_size=tokenizer.vocab_size, vae=dict(vae.config), **size)
    config = HunyuanImage3Config.from_dict(cfg)
    latents = encode_pool(vae, pool)
    model, steps, per_step = train_transformer(config, latents, pool, tokenizer, transformer_steps, batch, device,
                                               rng, log, lr=lr, deadline=deadline, init_from=init_from)
    # 4 shards: each under the 16 MiB a device run can send back
    save_release_format(out_dir, cfg, model.cpu(), vae.cpu(), num_shards=4, seed=seed, generation=GENERATION)
    log(f"trained in {time.time() - start:.0f} s on {device} ({vae_steps} VAE steps at batch {vae_batch}, "
        f"{steps} transformer steps at batch {batch}, {per_step * 1e3:.1f} ms per step, lr {lr}, "
        f"model {model_size or 'default'}, one-object share {one_object_share}); wrote {out_dir}")
    return out_dir
