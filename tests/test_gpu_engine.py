"""GPU: the engine's whole sampling loop (guidance, Euler step, the non-finite check, progress)
reads nothing back to the host inside a step, prompts of different lengths batched together
give each prompt's own image, and the text prefix's prefill replayed as a CUDA graph caches what
the eager prefill caches."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine import EngineConfig, SamplingParams
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.planner import work_items
from epdiff.models.hunyuan_image3.pipeline import PREFILL_BUCKET

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["a small red circle on the left", "a large green triangle at the bottom and a small blue square at the top"]


@pytest.fixture
def pipe(tiny_model):
    # Head dim 64: the grouped-GEMM path of the experts needs 16-byte aligned rows.
    model = tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=128)
    config = EngineConfig(model, device="cuda").resolve()
    parallel = ParallelState.single(torch.device("cuda"))
    pipeline = config.model_info.load_pipeline(parallel, torch.bfloat16, config.load_format, None, decode=True)
    return config, pipeline, parallel


def items(config, prompts, steps=4):
    out = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(prompt, num_inference_steps=steps, guidance_scale=4.0, seed=5 + i).resolve(config)
        out += work_items(i, params)
    return out


def run(pipe, tasks, on_step=None):
    config, pipeline, parallel = pipe
    return denoise(pipeline, tasks, parallel, RankMetrics(0, ""), on_step)


def test_the_sampling_loop_has_no_host_sync_after_its_first_step(pipe):
    seen = []

    def on_step(step, total):  # steps 2..N run with any host sync raising
        seen.append(step)
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")

    try:
        out = run(pipe, items(pipe[0], PROMPTS), on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen == [1, 2, 3, 4] and all(image.nonfinite_step is None for image in out)


def test_prompts_of_different_lengths_batched_match_each_alone(pipe):
    together = run(pipe, items(pipe[0], PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        alone = run(pipe, [item for item in items(pipe[0], PROMPTS) if item.request_id == i])[0]
        ref = alone.latents
        err = (together[i].latents - ref).abs().max() / ref.abs().max()
        assert err < 3e-2, f"prompt {i}: {err:.3g}"  # bf16: batch shape changes the GEMM blocking
        print(f"prompt {i}: max relative difference batched vs alone {err:.3g}")


def test_a_replayed_prefill_caches_what_the_eager_prefill_caches(pipe):
    """Prompts of different lengths, guidance on: the third batch start replays the captured
    prefill; its caches match the same padded prefill run eagerly and the unpadded one (bf16,
    relative to the caches' norm), and the images match --enforce-eager's."""
    config, pipeline, parallel = pipe
    starts = []
    real = pipeline._bucketed_prefill

    def recording(rows, lengths):
        caches = real(rows, lengths)
        starts.append((rows, lengths, caches))
        return caches

    pipeline._bucketed_prefill = recording
    graphed = [run(pipe, items(config, PROMPTS)) for _ in range(3)]  # eager, captured, replayed
    (step,) = pipeline._prefill_graphs.steps.values()
    assert len(starts) == 3 and step.graph is not None and step.calls == 3

    rows, lengths, replayed = starts[-1]
    longest = max(lengths)
    with torch.inference_mode():
        bucket = -(-longest // PREFILL_BUCKET) * PREFILL_BUCKET
        prefix, positions = pipeline._right_padded(rows, lengths, bucket)
        padded = pipeline._prefill_as_tuples(prefix.cuda(), positions.cuda())
        unpadded = pipeline.transformer.prefill(prefix[:, :longest].cuda(), positions[:, :longest].cuda(), lengths)
    for cache, (k, v), plain in zip(replayed, padded, unpadded):
        for got, same_shape, other in ((cache.k, k, plain.k), (cache.v, v, plain.v)):
            mask = cache.key_mask[..., None, None]
            for want, bound in ((same_shape[:, :longest], 1e-3), (other, 5e-3)):
                err = ((got - want) * mask).float().norm() / (want * mask).float().norm()
                assert err < bound, f"replayed prefill's caches against {tuple(want.shape)} eager: {err:.3g}"
    pipeline._bucketed_prefill = real

    pipeline.use_cuda_graphs = False
    try:
        eager = run(pipe, items(config, PROMPTS))
    finally:
        pipeline.use_cuda_graphs = True
    for a, b in zip(graphed[-1], eager):
        err = (a.latents - b.latents).abs().max() / b.latents.abs().max()
        assert err < 3e-2, f"graphed against eager image latents: {err:.3g}"
