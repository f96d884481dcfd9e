"""GPU: Nucleus-Image's denoising step replayed as a CUDA graph (one GPU, no step cache) gives the
eager step's latents (bf16 within 0.5 %, relative to their norm), and replays from the third step."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.models.base import ImageTask
from epdiff.models.registry import model_info

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_replayed_step_gives_the_eager_steps_latents(tmp_path, quantization, graph_replays):
    from epdiff.models.nucleus_image.make_tiny import make_tiny

    # Widths the grouped GEMMs take (16-byte aligned rows); 8 steps of a 256² image, guidance on.
    folder = make_tiny(str(tmp_path), hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                       moe_intermediate_dim=128, num_layers=6, seed=1)
    state = ParallelState.single(torch.device("cuda"))
    pipe = model_info(folder).load_pipeline(state, torch.bfloat16, "safetensors", quantization, False)
    tasks = [ImageTask(prompt, seed=3 + k, height=256, width=256, num_inference_steps=8, guidance_scale=4.0)
             for k, prompt in enumerate(["a small red circle on the left", "a blue square"])]
    graphed = denoise(pipe, tasks, state, RankMetrics(0, ""))
    assert graph_replays == [False] + [True] * 7  # the first step eager, the second captured, then replays
    pipe.use_cuda_graphs = False
    eager = denoise(pipe, tasks, state, RankMetrics(0, ""))
    for a, b in zip(graphed, eager):
        err = (a.latents - b.latents).norm() / b.latents.norm()
        assert err < 5e-3, f"graphed against eager latents: {err:.3g}"
