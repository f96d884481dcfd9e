"""Whole-transformer cases run inside the world's workers (see world.py)."""

from __future__ import annotations

import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.hunyuan_image3.config import HunyuanImage3Config
from epdiff.models.hunyuan_image3.loading import load_model
from epdiff.models.hunyuan_image3.resolution import snap
from epdiff.models.hunyuan_image3.tokenizer import HunyuanTokenizer

PROMPTS = ["a small red circle on the left", "two large blue squares at the top of a very wide green field"]
_reference = {}


def sequences(model_dir: str, prompt: str):
    tok = HunyuanTokenizer.from_pretrained(model_dir)
    base = _config(model_dir).image_base_size
    idx, h, w = snap(base, base, base)
    ids = tok.encode(prompt)
    return [tok.build_sequence(ids, idx, h // 16, w // 16, base), tok.build_uncond_sequence(ids, idx, h // 16, w // 16, base)]


def _config(model_dir):
    return HunyuanImage3Config.from_pretrained(model_dir)


def step_inputs(seq, prompt_index: int, latent_channels: int):
    g = torch.Generator().manual_seed(100 + prompt_index)
    h, w = seq.grid
    latents = torch.randn(1, latent_channels, h, w, generator=g)
    return latents, torch.tensor([750.0])


def run_step(model, seqs, prompt_index):
    """Prefill + one denoising step of the given branches (all with the same positions)."""
    seq = seqs[0]
    ts = seq.timestep_index
    ids = torch.stack([s.input_ids[:ts] for s in seqs])
    caches = model.prefill(ids, seq.positions[:ts])
    latents, t = step_inputs(seq, prompt_index, model.config.latent_channels)
    gen_positions = seq.positions[ts: seq.image_start + seq.image_len]
    return model(latents.expand(len(seqs), -1, -1, -1), t.expand(len(seqs)), gen_positions, caches)


def reference(model_dir, prompt_index, quantization=None):
    key = (model_dir, prompt_index, quantization)
    if key not in _reference:
        model, _ = load_model(model_dir, ParallelState.single(), quantization=quantization)
        _reference[key] = run_step(model, sequences(model_dir, PROMPTS[prompt_index]), prompt_index)
    return _reference[key]


def equivalence(rank, model_dir, configs, quantization=None):
    """configs: ParallelConfigs of the current world. Returns this rank's max errors against one
    rank with the same quantization."""
    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        model, _ = load_model(model_dir, state, quantization=quantization)
        prompt_index = state.dp.rank % len(PROMPTS)
        seqs = sequences(model_dir, PROMPTS[prompt_index])
        branches = [state.cfg.rank] if config.cfg_parallel_size == 2 else [0, 1]
        out = run_step(model, [seqs[b] for b in branches], prompt_index)
        ref = reference(model_dir, prompt_index, quantization)[branches]
        rows.append(dict(layout=config.describe(), ep=config.enable_expert_parallel, backend=config.all2all_backend,
                         rank=rank, prompt=prompt_index, branches=branches,
                         close=bool((out - ref).abs().max() <= 1e-5 * ref.abs().max()),
                         err=float((out - ref).abs().max()), scale=float(ref.abs().max())))
    return rows


def token_count_exchanges(rank, model_dir):
    """The all-gather backend's token counts on DP2 + EP: one exchange serves every MoE layer of a
    forward, the prefill and the first step each exchange once and later steps not at all, and a
    step of another size without a reset is refused (on every rank) before any collective."""
    from epdiff.distributed import collectives
    from layouts import layout

    state = ParallelState.build(layout(dp=2, ep=True), "cpu")
    model, _ = load_model(model_dir, state)
    seqs = sequences(model_dir, PROMPTS[rank])
    seq, ts = seqs[0], seqs[0].timestep_index
    latents, t = step_inputs(seq, rank, model.config.latent_channels)
    positions = seq.positions[ts: seq.image_start + seq.image_len]
    exchanges, gather = [], collectives.gather_counts

    def counted(*args, **kwargs):
        exchanges.append(args[0])
        return gather(*args, **kwargs)

    collectives.gather_counts = counted
    try:
        caches = model.prefill(seq.input_ids[None, :ts], seq.positions[:ts])
        for _ in range(3):
            model(latents, t, positions, caches)
        try:  # a smaller image against the same prefix: other token counts
            model(latents[:, :, :4, :4], t, positions[:17], caches)
            refused = None
        except ValueError as e:
            refused = str(e)
    finally:
        collectives.gather_counts = gather
    return dict(exchanges=exchanges, moe_layers=len(model.config.moe_topk), refused=refused)
