"""GPU: steps replayed as CUDA graphs against the eager steps: the text pass's one-token step writes
the same tokens (bf16 and FP8, a padded batch of two rows), a denoising step gives the same latents
(bf16 within 0.5 %)."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.write import write
from epdiff.kernels import graphs
from epdiff.models.base import ImageTask, TextSampling, TextTask
from epdiff.models.registry import model_info

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from epdiff.models.hunyuan_image3.make_tiny import make_tiny

    return make_tiny(str(tmp_path_factory.mktemp("instruct")), hidden_size=256, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, num_experts=8, moe_topk=2,
                     moe_intermediate_size=128, image_base_size=256, patch_embed_hidden_dim=64,
                     variant="instruct-distil", seed=3)


@pytest.mark.parametrize("quantization", [None, "fp8"])
@torch.inference_mode()
def test_a_captured_step_writes_what_the_eager_step_writes(folder, monkeypatch, quantization):
    info = model_info(folder)
    state = ParallelState.single(torch.device("cuda"))
    pipe = info.load_pipeline(state, torch.bfloat16, "safetensors", quantization, False)
    rows = [[(TextTask("a red circle", 1, "recaption", False, TextSampling(24)), True),
             (TextTask("two blue squares on the left of a green triangle", 2, "think_recaption", True,
                       TextSampling(24, temperature=0.8, top_k=50)), True)]]
    captured = write(pipe, info, rows, state)
    replays = []
    real = graphs.CudaGraphStep.__call__

    def counting(self, *inputs):
        out = real(self, *inputs)
        replays.append(self.graph is not None)
        return out

    monkeypatch.setattr(graphs.CudaGraphStep, "__call__", counting)
    write(pipe, info, rows, state)
    assert sum(replays) >= 20  # the steps after the first two replayed the graph
    monkeypatch.setattr(graphs.CudaGraphStep, "__call__", lambda self, *inputs: self.fn(*inputs))
    eager = write(pipe, info, rows, state)
    assert captured == eager


def counting_replays(monkeypatch) -> list:
    replays = []
    real = graphs.CudaGraphStep.__call__

    def counting(self, *inputs):
        out = real(self, *inputs)
        replays.append(self.enabled and self.graph is not None)
        return out

    monkeypatch.setattr(graphs.CudaGraphStep, "__call__", counting)
    return replays


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_a_captured_denoising_step_gives_the_eager_latents(folder, monkeypatch, quantization):
    info = model_info(folder)
    state = ParallelState.single(torch.device("cuda"))
    pipe = info.load_pipeline(state, torch.bfloat16, "safetensors", quantization, True)
    task = ImageTask("a red circle", 3, 256, 256, 6, 2.5, system_prompt=info.resolve_system_prompt(None))
    replays = counting_replays(monkeypatch)
    captured = denoise(pipe, [task, task], state, RankMetrics(rank=0, layout="1 GPU"))
    assert sum(replays) == 5  # steps 2..6
    pipe.use_cuda_graphs = False
    eager = denoise(pipe, [task, task], state, RankMetrics(rank=0, layout="1 GPU"))
    for a, b in zip(captured, eager):
        err = float((a.latents - b.latents).norm() / b.latents.norm())
        assert err <= 5e-3, err
