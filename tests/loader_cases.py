"""Loader cases run inside the world's workers."""

from epdiff.distributed.parallel_state import ParallelState
from epdiff.models.hunyuan_image3.loading import load_model
from epdiff.models.hunyuan_image3.weights import EXPERT
from layouts import layout


def read_share(rank, model_dir):
    state = ParallelState.build(layout(dp=2, ep=True), "cpu")
    model, ckpt = load_model(model_dir, state)
    experts_read = sorted(n for n in ckpt.tensors_read if EXPERT.match(n))
    expected = [f"model.layers.{i}.mlp.experts.{e}.{k}.weight" for i in model.model.layers
                for e in model.model.layers[i].mlp.local_expert_ids for k in ("gate_and_up_proj", "down_proj")]
    # Every read tensor is read whole here (no TP): bytes = their sizes on disk.
    expected_bytes = sum(ckpt.get(n).get_shape().__len__() and _nbytes(ckpt, n) for n in ckpt.tensors_read)
    return dict(ep_rank=state.ep.rank, expert_tensors_read=experts_read, expected_expert_tensors=expected,
                bytes_read=ckpt.bytes_read, expected_bytes=expected_bytes)


def _nbytes(ckpt, name):
    s = ckpt.get(name)
    n = 1
    for d in s.get_shape():
        n *= d
    return n * {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8}[s.get_dtype()]
