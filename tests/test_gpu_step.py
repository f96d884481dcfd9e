"""GPU: a denoising step of the whole transformer reads nothing back to the host."""

import pytest
import torch

from epdiff.distributed.launch import launch
from gpu_cases import step_host_syncs
from layouts import layout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def model_dir(tiny_model):
    # Head dim 64: the grouped-GEMM path of the experts needs 16-byte aligned rows.
    return tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=128)


def test_one_gpu_step_has_no_host_sync(model_dir):
    rows = launch(1, step_host_syncs, model_dir, [layout()])
    assert rows[0]["synced"] == "", rows


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_expert_parallel_step_has_no_host_sync(model_dir):
    layouts = [layout(cfg=2, ep=True), layout(tp=2, ep=True), layout(sp=2, ep=True)]
    rows = launch(2, step_host_syncs, model_dir, layouts)
    for r in rows:
        print(r)
    assert all(r["synced"] == "" for r in rows), rows
