"""bf16 / NCCL MoE equivalence, run on every GPU rank by launch()."""

import torch
import torch.distributed as dist

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.hunyuan_image3.loading import load_model
from layouts import BACKENDS
from model_cases import PROMPTS, sequences, step_inputs
from moe_cases import Dims, build_layer, make_tokens, make_weights, reference_moe, token_counts

GPU_DIMS = Dims(hidden=512, inter=256, shared_inter=256, experts=16, top_k=4)


def bf16_equivalence(device, layouts, tokens=256):
    """Per (layout, every registered backend, routing): max |parallel − single GPU| and both errors
    vs fp64, relative to the largest reference value. layouts: ParallelConfigs (EP is turned on)."""
    rows = []
    d = GPU_DIMS
    single = ParallelState.single(device)
    for base in layouts:
        for backend in BACKENDS:
            config = base.replace(enable_expert_parallel=True, all2all_backend=backend)
            state = ParallelState.build(config, device)
            for routing in ("random", "skewed"):
                w, common = make_weights(5, routing, True, config.ep_size, d)
                counts = token_counts(state.token.size, tokens, empty_rank=False)
                x_all = make_tokens(5, counts, routing, common)
                start = sum(counts[: state.token.rank])
                x = x_all[start: start + counts[state.token.rank]]
                with torch.inference_mode():
                    out = build_layer(state, w, True, "auto", d, torch.bfloat16)(x.to(device, torch.bfloat16))
                    one = build_layer(single, w, True, "auto", d, torch.bfloat16)(x.to(device, torch.bfloat16))
                ref, _ = reference_moe(x_all, w, True, d)
                ref = ref[start: start + x.shape[0]].to(device)
                scale = ref.abs().max()
                stat = torch.tensor([(out.float() - one.float()).abs().max() / scale,
                                     (out.double() - ref).abs().max() / scale,
                                     (one.double() - ref).abs().max() / scale], device=device)
                dist.all_reduce(stat, op=dist.ReduceOp.MAX)
                rows.append(dict(layout=config.describe(), routing=routing, vs_single=stat[0].item(),
                                 parallel_vs_fp64=stat[1].item(), single_vs_fp64=stat[2].item()))
    return rows


def step_host_syncs(device, model_dir, layouts):
    """Per layout (a ParallelConfig): prefill and a first step (which exchanges the token counts),
    then a second step with CUDA's sync debug mode on. Returns the layouts and whether the step
    synchronised."""
    rows = []
    for config in layouts:
        state = ParallelState.build(config, device) if config.world_size > 1 else ParallelState.single(device)
        model, _ = load_model(model_dir, state, torch.bfloat16, device)
        seqs = sequences(model_dir, PROMPTS[0])
        seqs = [seqs[state.cfg.rank]] if config.cfg_parallel_size == 2 else seqs
        seq, ts = seqs[0], seqs[0].timestep_index
        latents, t = step_inputs(seq, 0, model.config.latent_channels)
        latents, t = latents.to(device).expand(len(seqs), -1, -1, -1), t.to(device).expand(len(seqs))
        positions = seq.positions[ts: seq.image_start + seq.image_len].to(device)
        synced = None
        with torch.inference_mode():
            caches = model.prefill(torch.stack([s.input_ids[:ts] for s in seqs]), seq.positions[:ts])
            model(latents, t, positions, caches)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(latents, t, positions, caches)
                synced = ""
            except RuntimeError as e:
                synced = str(e).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        rows.append(dict(layout=config.describe(), synced=synced))
    return rows
