"""End to end on CPU: `epdiff generate` on every layout gives the single-rank image and latents."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from epdiff.cli import main

STEPS = ["--num-inference-steps", "3", "--no-progress", "--seed", "7"]
PROMPTS = ["--prompt", "a small red circle on the left"]
TWO_PROMPTS = PROMPTS + ["--prompt", "a large blue square at the top"]
EP = ["--enable-expert-parallel"]

# The command line end to end on each axis and one 4-rank mix (the other mixes: the transformer's
# and the MoE layer's layout tests, tests/test_model_parallel.py and tests/test_moe_parallel.py).
LAYOUTS = {
    "TP2": ["-tp", "2"], "SP2": ["-sp", "2"], "CFG2": ["--cfg-parallel-size", "2"], "DP2": ["-dp", "2"],
    "PP2": ["-pp", "2"], "TP2xCFG2": ["-tp", "2", "--cfg-parallel-size", "2"],
}


def generate(tmp_path, name, extra, prompts):
    out, lat = tmp_path / f"{name}.png", tmp_path / f"{name}.safetensors"
    assert main(["generate", *prompts, *STEPS, "--output", str(out), "--save-latents", str(lat), *extra]) == 0
    return out, load_file(str(lat))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    return {n: generate(d, f"single{n}", [], TWO_PROMPTS if n == 2 else PROMPTS) for n in (1, 2)}


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_single_rank_image(tmp_path, single, layout):
    extra = LAYOUTS[layout] + EP
    n = 2 if layout == "DP2" else 1
    prompts = PROMPTS
    if n == 2:  # the DP case reads its prompts from a file, one a line
        prompt_file = tmp_path / "prompts.txt"
        prompt_file.write_text(f"{TWO_PROMPTS[1]}\n\n{TWO_PROMPTS[3]}\n")
        prompts = ["--prompt-file", str(prompt_file)]
    out, latents = generate(tmp_path, layout, extra, prompts)
    ref_out, ref_latents = single[n]
    assert latents.keys() == ref_latents.keys()
    for key, ref in ref_latents.items():
        err = (latents[key] - ref).abs().max()
        assert err <= 1e-5 * ref.abs().max(), f"{key}: latents differ by {err}"
    files = [(out, ref_out)] if n == 1 else [(out.with_name(f"{layout}-{i}-0.png"), ref_out.with_name(f"single2-{i}-0.png"))
                                            for i in range(2)]
    for got, ref in files:
        assert np.abs(pixels(got) - pixels(ref)).max() <= 1, f"{got.name} differs from {ref.name} by more than 1 level"
    meta = Image.open(files[0][0]).text
    assert meta["prompt"] == "a small red circle on the left" and meta["seed"] == "7" and "EP=" in meta["parallel_layout"]


@pytest.mark.parametrize("args,message", [
    (["--prompt", "  "], "prompt is empty: '  '"),
    (["--prompt", "x", "--model", "/nonexistent/model"], "model path '/nonexistent/model' is not a folder"),
    (["--prompt", "x", "--height", "500", "--width", "100"], "aspect ratio"),
    (["--prompt", "x", "--height", "99999", "--width", "99999"], "height 99999 is far from the model's sizes (64 to "
                                                                 "256 pixels a side); give 32 to 512"),
    (["--prompt", "x", "--num-inference-steps", "0"], "num_inference_steps must be at least 1, got 0"),
    (["--prompt", "x", "--guidance-scale", "-1"], "guidance_scale must be in [0, 100], got -1.0"),
    (["--prompt", "x", "--guidance-scale", "nan"], "guidance_scale must be a finite number, got nan"),
    (["--prompt", "x", "--guidance-scale", "inf"], "guidance_scale must be a finite number, got inf"),
    (["--prompt", "x", "--guidance-scale", "1e300"], "guidance_scale must be in [0, 100], got 1e+300"),
    (["--prompt", "x", "--seed", str(2**64)], f"got {2**64} with n = 1"),
    (["--prompt", "x", "--seed", str(2**64 - 2), "--num-images-per-prompt", "3"], "with n = 3"),
    (["--prompt", "x", "--seed", str(-2**63 - 1)], f"got {-2**63 - 1}"),
    (["--prompt", "x", "--num-images-per-prompt", "0"], "number of images must be a positive integer, got 0"),
    (["--prompt", "x", "--output", "/nonexistent/dir/out.png"], "cannot write image '/nonexistent/dir/out.png'"),
    (["--prompt", "x", "--output", "/sys/x.png"], "cannot write image '/sys/x.png'"),
    (["--prompt", "x", "--output", "/proc/x.png"], "cannot write image '/proc/x.png'"),
    (["--prompt", "x", "--output", "out.txt"], "image path 'out.txt' has extension '.txt'"),
    (["--prompt", "x", "--output", "out"], "image path 'out' has extension '(none)'"),
    (["--prompt", "x", "--save-latents", "/sys/x.safetensors"], "cannot write --save-latents '/sys/x.safetensors'"),
    (["--prompt", "x", "--metrics-json", "/sys/m.json"], "cannot write --metrics-json '/sys/m.json'"),
    (["--prompt", "x", "--prompt-file", "/nonexistent/prompts.txt"], "cannot read --prompt-file"),
    (["--prompt", "x", "--cfg-parallel-size", "2", "--guidance-scale", "1"], "guidance scale 1.0 needs only the conditional branch"),
    (["--prompt", "x", "--device", "cuda"], "device 'cuda' was asked for, but this machine has no CUDA GPU"),
    (["--prompt", "x", "--quantization", "fp8", "--max-batch-size", "0"], "max_batch_size must be a positive integer"),
    (["--prompt", " ".join(["red"] * 13000)], "over the model's context of 12800"),
])
def test_bad_input_fails_before_any_worker_starts(capsys, monkeypatch, args, message, tmp_path):
    import epdiff.engine

    def no_engine(*a, **k):
        raise AssertionError("an engine was started for bad input")

    monkeypatch.setattr(epdiff.engine, "Engine", no_engine)
    monkeypatch.chdir(tmp_path)
    args = args if "--output" in args else [*args, "--output", str(tmp_path / "x.png")]
    assert main(["generate", *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # one line
    assert not list(tmp_path.iterdir())


def test_more_ranks_than_gpus_is_refused(capsys, monkeypatch):
    import epdiff.engine.params

    monkeypatch.setattr(epdiff.engine.params, "cuda_device_count", lambda: 4)
    assert main(["generate", "--prompt", "x", "-tp", "8"]) == 2
    assert "the layout needs 8 ranks on this machine, one GPU each, but it has 4 GPUs" in capsys.readouterr().err


MIXED = ["--prompt", "a small red circle on the left",
         "--prompt", "a large green triangle at the bottom and a small blue square at the top"]


@pytest.mark.parametrize("layout", [["-sp", "2"], ["-tp", "2", "--cfg-parallel-size", "2"]])
def test_prompts_of_different_lengths_batched_on_a_layout_give_the_single_rank_latents(tmp_path, layout):
    _, ref = generate(tmp_path, "mixed-single", ["--latents-only"], MIXED)
    _, got = generate(tmp_path, "mixed", ["--latents-only", *layout, *EP], MIXED)
    for key in ref:
        assert (got[key] - ref[key]).abs().max() <= 1e-5 * ref[key].abs().max(), key


def test_torchrun_runs_the_same_command(tmp_path, single):
    import subprocess
    import sys

    lat = tmp_path / "torchrun.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "epdiff.cli", "generate",
           *PROMPTS, *STEPS, "-tp", "2", *EP, "--output", str(tmp_path / "torchrun.png"), "--save-latents", str(lat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref = single[1][1]["prompt0_image0"]
    assert (load_file(str(lat))["prompt0_image0"] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_the_first_hour_of_the_command_line(tmp_path, capsys):
    """-n, names that sort, a 'wrote' line per image in order, the size actually made said, an
    empty prompt file named, defaults in --help."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a small red circle on the left"] * 11) + "\n")
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt-file", str(prompts), "-n", "2", "--num-inference-steps", "1",
                 "--no-progress", "--height", "100", "--width", "100", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    wrote = [line.split()[-1] for line in printed.splitlines() if line.startswith("  wrote ")]
    names = [f"img-{i:02d}-{k}.png" for i in range(11) for k in range(2)]
    assert [p.rsplit("/", 1)[-1] for p in wrote] == names == sorted(names)
    assert "size 100x100 (HxW) is made at the model's nearest size, 128x128" in printed
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert main(["generate", "--prompt-file", str(blank)]) == 2
    assert f"--prompt-file {str(blank)!r} has no prompt (every line is blank)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: out.png)" in help_text and "(default: 0)" in help_text


def test_written_checkpoints_are_readable_by_others(tmp_path, capsys):
    import os
    import stat

    model = tmp_path / "tiny"
    assert main(["make-tiny", str(model), "--hidden-size", "32", "--num-hidden-layers", "1", "--num-attention-heads",
                 "2", "--num-key-value-heads", "1", "--num-experts", "4", "--moe-intermediate-size", "16",
                 "--image-base-size", "128", "--patch-embed-hidden-dim", "32"]) == 0
    assert main(["quantize", str(model), str(tmp_path / "q"), "--quantization", "fp8"]) == 0
    assert re.search(r"8 expert tensors in fp8, [0-9.]+ [km]B -> [0-9.]+ [km]B", capsys.readouterr().out, re.I)
    for folder in (model, tmp_path / "q"):
        for name in os.listdir(folder):
            mode = stat.S_IMODE(os.stat(folder / name).st_mode)
            assert mode & 0o044 == 0o044, f"{name}: {oct(mode)}"


def test_commands_other_than_serve_need_no_server_packages():
    # A training or generation machine need not have the web server installed.
    code = ("import sys; sys.modules['uvicorn'] = sys.modules['fastapi'] = None\n"
            "from epdiff.cli import build_parser; build_parser().parse_args(['generate', '--prompt', 'x'])")
    subprocess.run([sys.executable, "-c", code], check=True)
