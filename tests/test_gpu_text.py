"""GPU: the text pass's one-token step replayed as a CUDA graph writes what the eager step writes
(bf16 and FP8, a padded batch of two rows, and a row joining at step 16: the same tokens)."""

import pytest
import torch

from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.write import TextCheck, write
from epdiff.kernels import graphs
from epdiff.models.base import TextSampling, TextTask
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
def test_a_captured_step_writes_what_the_eager_step_writes(folder, monkeypatch, request, quantization):
    info = model_info(folder)
    state = ParallelState.single(torch.device("cuda"))
    pipe = info.load_pipeline(state, torch.bfloat16, "safetensors", quantization, False)
    rows = [[(TextTask("a red circle", 1, "recaption", False, TextSampling(24)), True),
             (TextTask("two blue squares on the left of a green triangle", 2, "think_recaption", True,
                       TextSampling(24, temperature=0.8, top_k=50)), True)]]
    joining = (TextTask("a small yellow star", 3, "recaption", False, TextSampling(16)), True)

    def join_at_16(step):  # the step is captured again with the third row
        return TextCheck(join=[[joining]]) if step == 16 else TextCheck()

    captured = write(pipe, info, rows, state, check=join_at_16)
    replays = request.getfixturevalue("graph_replays")  # counted from here on
    write(pipe, info, rows, state)
    assert sum(replays) >= 20  # the steps after the first two replayed the graph
    monkeypatch.setattr(graphs.CudaGraphStep, "__call__", lambda self, *inputs: self.fn(*inputs))
    eager = write(pipe, info, rows, state, check=join_at_16)
    assert captured == eager and len(captured[0]) == 3

