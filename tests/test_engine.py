"""The persistent engine: batch planning over DP groups, one load for many requests, lockstep DP
batches, and a worker's death failing every waiting request loudly."""

import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest

from epdiff.config import ParallelConfig
from epdiff.engine import EngineConfig, EngineDeadError, ImageGenerator, SamplingParams
from epdiff.engine.planner import BatchPlanner, WritingRows


def params(prompt="p", n=1, steps=3, size=128, guidance=4.0, seed=0):
    return SamplingParams(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                          seed=seed, n=n)


def wait_running(future, timeout_s: float = 60.0):
    deadline = time.time() + timeout_s
    while not future.running():
        assert time.time() < deadline and not future.done(), "the request never started"
        time.sleep(0.01)


def ids(batch):
    return [[(i.request_id, i.image_index) for i in g] for g in batch.groups]


def test_a_requests_images_spread_over_dp_groups_before_they_batch():
    planner = BatchPlanner(dp_size=2, max_batch_size=2)
    planner.add(0, params(n=3))
    assert ids(planner.next_batch()) == [[(0, 0), (0, 2)], [(0, 1)]]
    assert planner.next_batch() is None


def test_other_requests_fill_idle_groups_then_batch_by_size_and_guidance():
    planner = BatchPlanner(dp_size=3, max_batch_size=2)
    planner.add(0, params("a"))
    planner.add(1, params("b", size=256))  # another size: its own group
    planner.add(2, params("c"))
    planner.add(3, params("d", guidance=2.0))  # no idle group, no group with its guidance: waits
    planner.add(4, params("e"))  # joins the least-filled group of its size and guidance
    planner.add(5, params("f"))  # and the next one the other group
    assert ids(planner.next_batch()) == [[(0, 0), (4, 0)], [(1, 0)], [(2, 0), (5, 0)]]
    assert ids(planner.next_batch()) == [[(3, 0)], [(None, 0)], [(None, 0)]]  # filler elsewhere
    assert len(planner) == 0


def test_dp_groups_of_a_batch_share_solver_and_step_cache():
    """DP groups run in lockstep: a request with another solver or cache (other model calls) waits
    for a batch of its own rather than taking an idle group."""
    from epdiff.sampling.step_cache import StepCacheConfig

    planner = BatchPlanner(dp_size=2, max_batch_size=4)
    planner.add(0, params())
    planner.add(1, replace(params(), solver="heun-2"))
    planner.add(2, replace(params(), cache=StepCacheConfig("taylor")))
    assert ids(planner.next_batch()) == [[(0, 0)], [(None, 0)]]
    assert ids(planner.next_batch()) == [[(1, 0)], [(None, 0)]]
    assert ids(planner.next_batch()) == [[(2, 0)], [(None, 0)]]


def test_the_oldest_request_fixes_the_steps_and_never_starves():
    planner = BatchPlanner(dp_size=2, max_batch_size=4)
    planner.add(0, params(steps=3))
    planner.add(1, params(steps=5))
    planner.add(2, params(steps=3))
    first = planner.next_batch()
    assert {i.request_id for i in first.images} == {0, 2} and first.num_inference_steps == 3
    second = planner.next_batch()
    assert [i.request_id for i in second.images] == [1] and second.num_inference_steps == 5


def test_an_idle_group_runs_filler_that_is_not_reported():
    planner = BatchPlanner(dp_size=4, max_batch_size=4)
    planner.add(7, params(n=2))
    batch = planner.next_batch()
    assert all(len(g) == 1 for g in batch.groups)
    assert [g[0].request_id for g in batch.groups] == [7, 7, None, None]
    assert [i.image_index for i in batch.images] == [0, 1]


def test_a_cancelled_request_is_not_run():
    planner = BatchPlanner(dp_size=1, max_batch_size=4)
    planner.add(0, params("a"))
    planner.add(1, params("b"))
    planner.cancel(0)
    assert [i.request_id for i in planner.next_batch().images] == [1]


def test_text_passes_join_a_writing_batch_while_its_rows_write_and_no_image_or_older_edit_waits():
    def writes(prompt, images=()):
        return SamplingParams(prompt, task="think", max_new_tokens=8, seed=0, images=images)

    def ids(groups):
        return [[i.request_id for i in g] for g in groups]

    planner = BatchPlanner(dp_size=2, max_batch_size=2)
    planner.add(0, writes("a"))
    first = planner.next_batch()
    assert ids(first.groups) == [[0], [None]]
    rows = WritingRows(first.groups)
    for request_id in (1, 2, 3, 4):
        planner.add(request_id, writes("b"))
    # The least-filled group first (a filler row is not one), up to max_batch_size rows a group.
    joined = planner.join_writing(rows)
    assert ids(joined) == [[2], [1, 3]] and planner.oldest == 4
    rows.join_sent(joined)
    # Rows sent to join count until the worker takes them (at its next check, every 16 steps).
    rows.report((1, 0), 0)
    assert rows.rows() == [2, 2] and not rows.any_ended and planner.join_writing(rows) is None
    rows.report((2, 2), 1)
    assert rows.rows() == [2, 2] and not rows.any_ended and planner.join_writing(rows) is None
    # A row has ended: its images wait for the batch's end, so nothing joins any more (else later
    # rows could keep it waiting without bound), whatever room there is.
    rows.report((1, 1), 2)
    assert rows.any_ended and planner.join_writing(rows) is None and planner.oldest == 4

    planner = BatchPlanner(dp_size=1, max_batch_size=4)
    planner.add(0, writes("a"))
    rows = WritingRows(planner.next_batch().groups)
    planner.add(1, writes("b"))
    planner.add(2, writes("edit", images=("an input image",)))
    planner.add(3, writes("c"))
    assert ids(planner.join_writing(rows)) == [[1]]  # then the edit: it starts a batch of its own
    assert planner.join_writing(rows) is None

    planner = BatchPlanner(dp_size=1, max_batch_size=4)
    planner.add(0, writes("a"))
    rows = WritingRows(planner.next_batch().groups)
    planner.add(1, params())
    planner.add(2, writes("b"))
    assert planner.join_writing(rows) is None  # images wait: they run next, nothing joins


@pytest.fixture(scope="module")
def generator():
    with ImageGenerator(data_parallel_size=2, enable_expert_parallel=True) as g:
        yield g


def test_generate_twice_loads_once_and_dp_groups_run_different_prompts_together(generator):
    pids = list(generator.engine._workers.pids)
    load = [m["load_seconds"] for m in generator.rank_metrics]
    steps_before = [m["steps_total"] for m in generator.rank_metrics]
    first = generator.generate_outputs(["a small red circle on the left", "a large blue square at the top"],
                                       num_inference_steps=3, seed=11)
    # Both prompts in one batch, one on each DP group: each rank ran 3 steps, not 6.
    assert [m["steps_total"] - n for m, n in zip(generator.rank_metrics, steps_before)] == [3, 3]
    again = generator.generate_outputs("a small red circle on the left", num_inference_steps=3, seed=11)
    assert generator.engine._workers.pids == pids and [m["load_seconds"] for m in generator.rank_metrics] == load
    assert np.abs(first[0].images[0].pixels.astype(int) - again[0].images[0].pixels.astype(int)).max() <= 1
    assert first[1].images[0].seed == 12 and first[0].params.num_inference_steps == 3


def test_python_api_images_carry_their_metadata(generator, tmp_path):
    image = generator.generate("a small red circle on the left", num_inference_steps=2, seed=21)[0]
    assert image.info["seed"] == "21" and image.info["prompt"] == "a small red circle on the left"
    image.save(tmp_path / "x.png")
    image.save(tmp_path / "x.jpg")
    from PIL import Image
    text = Image.open(tmp_path / "x.png").text
    assert text["seed"] == "21" and text["steps"] == "2" and "DP=2" in text["parallel_layout"]
    assert b'"seed": "21"' in Image.open(tmp_path / "x.jpg").info["comment"]


def test_concurrent_submissions_all_complete(generator):
    engine = generator.engine
    futures = [engine.submit(params(f"a small {c} circle on the left", seed=i))
               for i, c in enumerate(["red", "green", "blue", "yellow", "purple"])]
    outs = [f.result(timeout=300) for f in futures]
    assert [o.images[0].seed for o in outs] == [0, 1, 2, 3, 4]
    assert all(o.inference_seconds > 0 and o.images[0].pixels.shape == (128, 128, 3) for o in outs)


def test_prompts_of_different_lengths_share_a_batch_and_give_their_own_images():
    prompts = ["a small red circle on the left", "a large green triangle at the bottom and a small blue square"]
    with ImageGenerator(max_batch_size=4) as g:
        together = g.generate_outputs(prompts, num_inference_steps=3, seed=21)
        assert len(g.rank_metrics[0]["step_seconds"]) == 3  # one batch
        alone = [g.generate_outputs(p, num_inference_steps=3, seed=21 + i)[0] for i, p in enumerate(prompts)]
    for a, b in zip(together, alone):
        ref = b.images[0].latents
        assert (a.images[0].latents - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_a_dead_worker_fails_waiting_requests_naming_its_rank():
    engine = ImageGenerator(tensor_parallel_size=2, enable_expert_parallel=True).engine
    try:
        futures = [engine.submit(params(steps=300, seed=i)) for i in range(3)]
        wait_running(futures[0])
        os.kill(engine._workers.pids[1], signal.SIGKILL)
        for f in futures:
            with pytest.raises(EngineDeadError, match="worker rank 1"):
                f.result(timeout=60)
        assert not engine.alive
        with pytest.raises(EngineDeadError, match="worker rank 1"):
            engine.submit(params())
    finally:
        engine.close()
    deadline = time.time() + 15
    while not engine._workers.all_exited() and time.time() < deadline:
        time.sleep(0.2)
    assert engine._workers.all_exited()


def test_engine_config_refuses_bad_fields():
    from epdiff.config import ConfigError

    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        EngineConfig(quantization="int3").resolve()
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        EngineConfig(device="tpu").resolve()
    with pytest.raises(ConfigError, match="experts cannot be split evenly over EP size 3"):
        EngineConfig(parallel=ParallelConfig(data_parallel_size=3, enable_expert_parallel=True)).resolve()


def test_an_engine_built_in_a_short_lived_thread_keeps_its_workers():
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(
        engine=ImageGenerator(data_parallel_size=2, enable_expert_parallel=True).engine))
    thread.start()
    thread.join()
    engine = box["engine"]
    try:
        time.sleep(1.0)  # torch's spawn would have the workers signalled as the thread ended
        out = engine.submit(params(steps=2)).result(timeout=120)
        assert out.images[0].pixels.shape == (128, 128, 3) and engine.alive
    finally:
        engine.close()


def test_close_gives_up_on_a_batch_that_outlasts_its_timeout():
    engine = ImageGenerator().engine
    future = engine.submit(params(steps=10_000))  # abandoned at its next step once close gives up
    wait_running(future)
    engine.close(timeout_s=0.3)
    with pytest.raises(EngineDeadError, match="closed while a batch ran longer than 0.3 s"):
        future.result(timeout=30)
    assert not engine.alive
