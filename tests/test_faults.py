"""Faults during a run: corrupt weights, a failing image save, a run killed part-way, and what
the images' metadata and the DP layout promise (each image reproducible alone, shared over DP)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
from safetensors.torch import load_file

from epdiff.cli import main
from epdiff.engine.params import default_model_dir

STEPS = ["--num-inference-steps", "3", "--no-progress"]
PROMPT = ["--prompt", "a small red circle on the left"]


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def corrupt_copy(tmp_path) -> str:
    """The built-in model with one attention weight's bytes overwritten (headers intact)."""
    model = tmp_path / "corrupt-model"
    shutil.copytree(default_model_dir(), model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.qkv_proj.weight"
    shard = model / index["weight_map"][name]
    raw = shard.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    start = 8 + header_len + begin
    shard.write_bytes(raw[:start] + b"\xff" * (end - begin) + raw[start + end - begin:])  # bf16 0xffff: NaN
    return str(model)


def test_corrupt_tensor_data_fails_naming_rank_and_step(tmp_path, capsys):
    out = tmp_path / "x.png"
    code = main(["generate", *PROMPT, *STEPS, "--model", corrupt_copy(tmp_path), "--output", str(out),
                 "-tp", "2", "--enable-expert-parallel"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "non-finite values (NaN or inf) in the latents of image 0" in err and "on rank 0 at step 1 of 3" in err
    assert not out.exists()


def test_a_failed_image_save_still_writes_latents_and_metrics(tmp_path, capsys, monkeypatch):
    import epdiff.engine.files

    def disk_full(path, *args):
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(epdiff.engine.files, "save_image", disk_full)
    lat, metrics = tmp_path / "l.safetensors", tmp_path / "m.json"
    code = main(["generate", *PROMPT, *STEPS, "--output", str(tmp_path / "x.png"), "--save-latents", str(lat),
                 "--metrics-json", str(metrics)])
    err = capsys.readouterr().err
    assert code == 1 and "cannot write image" in err and "No space left on device" in err
    assert set(load_file(str(lat))) == {"prompt0_image0"}
    assert len(json.loads(metrics.read_text())[0]["step_seconds"]) == 3
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*tmp"))


def test_a_killed_prompt_file_run_keeps_the_finished_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    colours = ["red", "green", "blue", "yellow", "purple"] * 3
    prompts.write_text("\n".join(f"a small {c} circle on the left" for c in colours))
    # One image a batch, so that images land one after another while the run goes on.
    cmd = [sys.executable, "-m", "epdiff.cli", "generate", "--prompt-file", str(prompts), "--no-progress",
           "--num-inference-steps", "40", "--max-batch-size", "1", "--output", str(tmp_path / "img.png")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(list(tmp_path.glob("img-*.png"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = sorted(tmp_path.glob("img-*.png"))
    assert 2 <= len(done) < len(colours), proc.stderr.read().decode()[-2000:]
    for path in done:  # whole images, never half-written ones
        assert Image.open(path).size == (128, 128) and Image.open(path).text["seed"]


def test_dp_shares_one_prompts_images_and_each_seed_regenerates_its_image(tmp_path):
    out, metrics = tmp_path / "dp.png", tmp_path / "m.json"
    assert main(["generate", *PROMPT, *STEPS, "--seed", "5", "--num-images-per-prompt", "2", "-dp", "2",
                 "--enable-expert-parallel", "--output", str(out), "--metrics-json", str(metrics)]) == 0
    # One batch on each DP group (3 steps each), not both images on one group (6 steps).
    assert [len(m["step_seconds"]) for m in json.loads(metrics.read_text())] == [3, 3]
    second = tmp_path / "dp-0-1.png"
    seed = Image.open(second).text["seed"]
    assert seed == "6"
    alone = tmp_path / "alone.png"
    assert main(["generate", *PROMPT, *STEPS, "--seed", seed, "--output", str(alone)]) == 0
    assert np.abs(pixels(second) - pixels(alone)).max() <= 1
    first = pixels(tmp_path / "dp-0-0.png")
    assert np.abs(first - pixels(alone)).max() > 1  # a different seed draws a different image


def test_ctrl_c_stops_a_generate_run_and_its_workers(tmp_path):
    from serve_helpers import alive, children

    cmd = [sys.executable, "-m", "epdiff.cli", "generate", *PROMPT, "--no-progress", "--num-inference-steps", "5000",
           "-tp", "2", "--enable-expert-parallel", "--output", str(tmp_path / "x.png")]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(children(proc.pid)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = children(proc.pid)
    time.sleep(2.0)  # into the batch
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    assert proc.wait(30) == 130, proc.stderr.read().decode()[-2000:]
    deadline = time.time() + 15
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert workers and not any(alive(p) for p in workers)
    assert not (tmp_path / "x.png").exists()
