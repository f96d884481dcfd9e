"""HunyuanImage-3.0 Instruct and Instruct-Distil (issue 22, docs/architecture.md 'Instruct'): epdiff's
final latents against Tencent's code on the same tiny checkpoints (tensors its code produced,
scripts/reference_instruct.py), every layout with EP against one rank, and the refusals."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from epdiff.config import ConfigError
from epdiff.distributed.parallel_state import ParallelState
from epdiff.engine.denoise import RankMetrics, denoise
from epdiff.engine.params import EngineConfig, RequestError, SamplingParams
from epdiff.models.base import ImageTask, InputImage
from epdiff.models.registry import model_info
from instruct_cases import CASES, REFERENCE, input_image, make_checkpoint
from layouts import layout

_folders: dict = {}
_one_rank: dict = {}

def checkpoint(variant: str, layers: int | None = None) -> str:
    """One folder per variant (and layer count) for the session (workers of the test world write their own)."""
    key = variant, layers
    if key not in _folders:
        import tempfile
        folder = tempfile.mkdtemp(prefix=f"epdiff-{variant}-")
        _folders[key] = make_checkpoint(folder, variant, **({} if layers is None else {"num_hidden_layers": layers}))
    return _folders[key]


def task(case: dict, seed_offset: int = 0) -> ImageTask:
    info = model_info(checkpoint(case["variant"], case.get("layers")))
    height, width = case["size"] if isinstance(case["size"], tuple) else (case["size"], case["size"])
    return ImageTask(case["prompt"], seed=case["seed"] + seed_offset, height=height, width=width,
                     num_inference_steps=case["steps"], guidance_scale=case["guidance"], solver=case["solver"],
                     system_prompt=info.resolve_system_prompt(None),
                     images=tuple(input_image(name) for name in case.get("images", ())))


def draw(state: ParallelState, case: dict, seed_offset: int = 0) -> torch.Tensor:
    pipe = model_info(checkpoint(case["variant"], case.get("layers"))).load_pipeline(state, torch.float32,
                                                                                   "safetensors", None, False)
    images = denoise(pipe, [task(case, seed_offset)], state, RankMetrics(rank=state.global_rank,
                                                                         layout=state.config.describe()))
    return images[0].latents


@pytest.mark.parametrize("name", list(CASES))
def test_final_latents_match_the_reference_code(name):
    from safetensors.torch import load_file

    expected = load_file(REFERENCE)[name]
    out = draw(ParallelState.single(), CASES[name])
    assert out.shape == expected.shape
    err = float((out - expected).norm() / expected.norm())
    assert err <= 1e-4, f"{name}: relative error {err:.2e} against Tencent's code"


def layouts_against_one_rank(rank: int, configs, names) -> list[dict]:
    rows = []
    for config in configs:
        state = ParallelState.build(config, "cpu")
        for name in names:
            name, layers = name if isinstance(name, tuple) else (name, None)
            case = dict(CASES[name], layers=layers)
            offset = state.dp.rank  # DP ranks draw different images
            out = draw(state, case, offset)
            key = (name, layers, offset)
            if key not in _one_rank:
                _one_rank[key] = draw(ParallelState.single(), case, offset)
            ref = _one_rank[key]
            err = float((out - ref).abs().max())
            rows.append(dict(layout=config.describe(), case=name, rank=rank, err=err,
                             close=err <= 1e-5 * float(ref.abs().max())))
    return rows


@pytest.mark.parametrize("world", [2, 4])
def test_every_layout_with_ep_gives_the_one_rank_result(world8, world):
    configs = {2: [layout(tp=2, ep=True), layout(sp=2, ep=True, backend="alltoall"), layout(pp=2, ep=True)],
               4: [layout(cfg=2, dp=2, ep=True)]}[world]
    # two input images on 4 layers (so that a later pipeline stage's layers read the images'
    # prefix), an edit with real CFG over CFG and DP (Distil's three step tokens on TP2, SP2 and PP2:
    # tests/test_text_pass.py's layouts, after its text pass)
    names = {2: [("edit-two", 4)], 4: ["edit-instruct"]}[world]
    rows = [r for per_rank in world8.run(world, layouts_against_one_rank, configs, names) for r in per_rank]
    assert rows and all(r["close"] for r in rows), [r for r in rows if not r["close"]]


def test_a_distilled_model_refuses_cfg_parallel_and_runs_one_branch():
    folder = checkpoint("instruct-distil")
    info = model_info(folder)
    assert info.num_guidance_branches(2.5) == 1 and info.default_num_inference_steps == 8
    with pytest.raises(ConfigError, match=r"--cfg-parallel-size 2: this model has guidance distilled into it"):
        EngineConfig(folder, parallel=layout(cfg=2)).resolve()


def test_requests_name_their_solver_and_system_prompt():
    config = EngineConfig(checkpoint("instruct")).resolve()
    params = SamplingParams("a red circle", solver="kutta-4", system_prompt="en_recaption").resolve(config)
    assert params.solver == "kutta-4" and params.system_prompt.startswith("You rewrite")
    assert SamplingParams("a red circle", system_prompt="Draw it flat.").resolve(config).system_prompt == "Draw it flat."
    assert SamplingParams("a red circle", system_prompt="None").resolve(config).system_prompt == ""
    with pytest.raises(RequestError, match="unknown solver 'rk45'"):
        SamplingParams("a red circle", solver="rk45").resolve(config)
    with pytest.raises(RequestError, match=r"cache .taylor. works with one-call solvers only \(euler\), not .heun-2."):
        SamplingParams("a red circle", solver="heun-2", cache="taylor").resolve(config)
    taylor = EngineConfig(checkpoint("instruct"), cache="taylor").resolve()  # the server's default cache
    assert not SamplingParams("a red circle", solver="heun-2").resolve(taylor).cache.enabled
    with pytest.raises(RequestError, match="system prompt 'custom' needs its text"):
        SamplingParams("a red circle", system_prompt="custom").resolve(config)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_images_are_refused_before_any_compute(tmp_path):
    config = EngineConfig(checkpoint("instruct-distil")).resolve()
    red = input_image("red-square")
    params = SamplingParams("make it blue", images=[red]).resolve(config)
    assert (params.height, params.width) == (256, 256) and params.images[0].mode == "RGB"
    wide = SamplingParams("make it blue", images=[input_image("wide-circle")]).resolve(config)
    assert (wide.height, wide.width) == (192, 320)  # the first image's own bucket
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [([str(text)], "image 0 is not an image Pillow can read"),
             ([b"GIF89a"], "image 0 is not an image Pillow can read"),
             ([str(tmp_path / "missing.png")], "image 0: no file"),
             ([42], "image 0 must be a PIL image, a file path or the file's bytes, got int"),
             ([red] * 5, "5 input images: the model takes at most 4"),
             ([Image.new("RGB", (8, 300))], "image 0 is 8x300: each side must be at least 16 pixels"),
             ([Image.new("L", (5000, 5000))], "image 0 is 5000x5000: over the 16777216 pixels")]
    for images, message in cases:
        with pytest.raises(RequestError, match=message):
            SamplingParams("make it blue", images=images).resolve(config)
    assert SamplingParams("x", images=red).resolve(config).images[0].size == (256, 256)  # one image, unwrapped
    # A file (its path or its bytes) is checked by decoding it once, then kept as the file until its batch.
    (tmp_path / "red.png").write_bytes(png_bytes(red))
    for given in (str(tmp_path / "red.png"), png_bytes(red)):
        kept = SamplingParams("x", images=[given]).resolve(config).images[0]
        assert isinstance(kept, InputImage) and kept.size == (256, 256) and len(kept.data) < 2000
        assert np.array_equal(np.asarray(kept.rgb()), np.asarray(red))
    tall = SamplingParams("x", images=[Image.new("RGB", (100, 600))]).resolve(config)  # beyond 4:1: the extreme bucket
    assert (tall.height, tall.width) == (512, 128)
    with pytest.raises(RequestError, match="images must be a list of images, got int"):
        SamplingParams("x", images=3).resolve(config)
    gray = SamplingParams("x", images=[Image.new("LA", (64, 64))]).resolve(config)
    assert gray.images[0].mode == "RGB"
    small = SamplingParams("make it blue", images=[red] * 4)
    info = config.model_info
    context = info.context
    info.context = 1200  # four 256² inputs: 4 × (4 + 256 + 1 + 64 + 1) = 1,304 tokens of images alone
    try:
        with pytest.raises(RequestError, match=r"with 256 image tokens and 4 input image\(s\) the sequence is"):
            small.resolve(config)
    finally:
        info.context = context
    base = EngineConfig(checkpoint("base")).resolve()
    with pytest.raises(RequestError, match=r"the model cannot edit images \(it has no vision encoder"):
        SamplingParams("make it blue", images=[red]).resolve(base)


def test_a_multi_call_solver_reports_steps_not_model_calls():
    from epdiff.engine import ImageGenerator

    with ImageGenerator(checkpoint("instruct-distil")) as generator:
        progress = []
        out = generator.engine.submit(SamplingParams("a red circle", num_inference_steps=3, solver="kutta-4"),
                                      on_progress=lambda step, total: progress.append((step, total))).result()
    assert out.images[0].full_steps == 3 and len(out.step_seconds) == 3
    assert progress[-1] == (3, 3) and all(total == 3 for _, total in progress)
