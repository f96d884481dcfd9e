"""A text prefix's prefill right-padded to its bucket (the form a CUDA graph replays on one GPU)
caches what the unpadded prefill caches: the same latents, on CPU in fp32, for one row, for both
guidance branches and for prompts of different lengths batched (the caches' key mask)."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine import EngineConfig, SamplingParams
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.planner import work_items
from epdiff.kernels.graphs import CudaGraphsByShape
from epdiff.models.hunyuan_image3 import pipeline as hunyuan_pipeline

PROMPTS = ["a small red circle on the left", "a large green triangle at the bottom and a small blue square at the top"]


def images(folder, prompts, guidance, bucketed: bool, monkeypatch, steps=3):
    config = EngineConfig(folder, device="cpu").resolve()
    state = ParallelState.single(torch.device("cpu"))
    pipe = config.model_info.load_pipeline(state, torch.float32, config.load_format, None, decode=False)
    padded = []
    if bucketed:
        real = pipe._bucketed_prefill

        def spy(rows, lengths):
            padded.append(lengths)
            return real(rows, lengths)
        monkeypatch.setattr(pipe, "replays_graphs", lambda: True)
        monkeypatch.setattr(pipe, "_bucketed_prefill", spy)
    tasks = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=5 + i,
                                height=256, width=256).resolve(config)
        tasks += work_items(i, params)
    out = denoise(pipe, tasks, state, RankMetrics(0, ""))
    assert not bucketed or padded, "the bucketed prefill did not run"
    return torch.stack([image.latents for image in out]), padded


@pytest.mark.parametrize("prompts, guidance", [(PROMPTS[:1], 1.0), (PROMPTS[:1], 4.0), (PROMPTS, 4.0)],
                         ids=["one-row", "two-branches", "two-prompts"])
def test_a_prefix_padded_to_its_bucket_caches_what_the_unpadded_one_does(tiny_model, monkeypatch, prompts,
                                                                         guidance):
    folder = tiny_model()
    eager, _ = images(folder, prompts, guidance, False, monkeypatch)
    bucketed, padded = images(folder, prompts, guidance, True, monkeypatch)
    assert all(max(lengths) < hunyuan_pipeline.PREFILL_BUCKET for lengths in padded)  # so every row was padded
    assert len(padded[0]) == len(prompts) * (2 if guidance > 1 else 1)
    assert (len(set(padded[0])) > 1) == (len(prompts) > 1)  # rows of different lengths: the key mask
    torch.testing.assert_close(bucketed, eager, rtol=1e-5, atol=1e-5)


def test_graphs_by_shape_keep_the_most_recently_used_shapes():
    calls = []
    graphs = CudaGraphsByShape(lambda x: calls.append(x.shape) or x * 2, keep=2)
    for n in (1, 2, 1, 3):
        assert torch.equal(graphs(torch.ones(n)), torch.full((n,), 2.0))
    assert [key[0][0] for key in graphs.steps] == [(1,), (3,)] and len(calls) == 4
