"""Fail fast: bad layouts are refused before any worker starts; a failing worker stops the run."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from epdiff.cli import main
from epdiff.config import ConfigError, ParallelConfig
from epdiff.distributed.launch import WorkerError, launch
from launch_cases import rank_two_fails_while_others_wait, sum_of_ranks

TESTS = os.path.dirname(__file__)


@pytest.mark.parametrize("argv,message", [
    (["-tp", "2", "--world-size", "3"], "world size 3 != PP×DP×CFG×SP×TP = 1×1×1×1×2 = 2"),
    (["-tp", "2", "-dp", "3", "--enable-expert-parallel", "--num-experts", "64"],
     "64 experts cannot be split evenly over EP size 6"),
    (["-tp", "8", "--num-experts", "4"], "tensor_parallel_size 8 > number of experts 4"),
    (["--cfg-parallel-size", "3"], "cfg_parallel_size must be 1 or 2"),
    (["-tp", "2", "--enable-expert-parallel", "--num-experts", "0"], "the model has no experts"),
    (["-tp", "0"], "tensor_parallel_size must be a positive integer, got 0"),
])
def test_invalid_layout_is_refused_with_its_numbers(argv, message, capsys):
    assert main(["layout", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--all2all-backend", "deepep"), ("--expert-placement", "random")])
def test_unknown_backend_or_placement_exits_nonzero(flag, value):
    proc = subprocess.run([sys.executable, "-m", "epdiff.cli", "layout", flag, value],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and value in proc.stderr


def test_config_errors_name_the_values():
    with pytest.raises(ConfigError, match="unknown all2all_backend 'nccl'"):
        ParallelConfig(all2all_backend="nccl")
    with pytest.raises(ConfigError, match="unknown expert_placement 'x'"):
        ParallelConfig(expert_placement="x")
    assert ParallelConfig(tensor_parallel_size=2, cfg_parallel_size=2, data_parallel_size=4).ep_size == 16


def test_layout_prints_the_seed_example(capsys):
    assert main(["layout", "-tp", "2", "--cfg-parallel-size", "2", "-dp", "4", "--enable-expert-parallel"]) == 0
    out = capsys.readouterr().out
    assert "expert parallel (1 group of 16): [0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]" in out
    assert "tensor parallel (8 groups of 2): [0,1] [2,3] [4,5] [6,7] [8,9] [10,11] [12,13] [14,15]" in out


def test_spawned_workers_run_collectives():
    assert launch(2, sum_of_ranks) == 1.0


def test_failing_worker_stops_the_others_fast():
    start = time.time()
    with pytest.raises(WorkerError, match=r"worker rank 2 failed: RuntimeError: planted failure in rank two"):
        launch(4, rank_two_fails_while_others_wait)
    assert time.time() - start < 30


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["ctrl-c", "parent-killed"])
def test_no_worker_outlives_its_launcher(tmp_path, how):
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {TESTS!r})
        from epdiff.distributed.launch import launch
        from launch_cases import record_pid_and_wait
        launch(2, record_pid_and_wait, {str(tmp_path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(list(tmp_path.glob("*.pid"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2, proc.stderr.read().decode() if proc.poll() is not None else "workers did not start"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground group
    else:
        proc.kill()
    proc.wait(30)
    deadline = time.time() + 15
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), f"orphan workers left: {[p for p in pids if _alive(p)]}"
