"""`epdiff serve` on CPU (gloo, the built-in model, 2 ranks DP2 + EP) as a subprocess: the API's
answers, the images against `epdiff generate`'s, the errors, a full queue, a client that leaves,
a killed worker and SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from epdiff.serve.api import render_answer, server_sent_event
from serve_helpers import ServerProcess, alive, healthy_server, metric

LAYOUT = ["-dp", "2", "--enable-expert-parallel"]
STEPS = 3
PROMPTS = ["a small red circle on the left", "a large blue square at the top",
           "a small green triangle on the right", "a large yellow circle at the bottom"]
SEED = 100
# Request i: prompt i // 4, seed SEED + i; `epdiff generate` with the 16 prompts in that order and
# --seed SEED gives prompt i the seed SEED + i, the same image.
REQUESTS = [(PROMPTS[i // 4], SEED + i) for i in range(16)]
GENERATE = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with healthy_server([*LAYOUT, "--max-queue", "4", "--max-prompt-chars", "20000"],
                        tmp_path_factory.mktemp("serve") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def cli_images(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "cli.png"
    prompts = [arg for prompt, _ in REQUESTS for arg in ("--prompt", prompt)]
    subprocess.run([sys.executable, "-m", "epdiff.cli", "generate", *prompts, "--seed", str(SEED),
                    "--num-inference-steps", str(STEPS), "--no-progress", "--output", str(out), *LAYOUT],
                   check=True, capture_output=True, timeout=300)
    return [np.asarray(Image.open(out.with_name(f"cli-{i:02d}-0.png"))).astype(int) for i in range(len(REQUESTS))]


def decode(item) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
    image.load()
    return image


def generate(client, **body):
    return client.post(GENERATE, json={"num_inference_steps": STEPS, **body})


def test_health_models_and_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == "tiny-hunyuan-image3" and "DP=2" in model["parallel_layout"]
    assert model["default_size"] in model["image_sizes"] and len(set(model["image_sizes"])) == len(model["image_sizes"])
    page = client.get("/")
    assert page.status_code == 200 and "Generate" in page.text and page.headers["content-type"].startswith("text/html")


def test_sixteen_requests_four_in_flight_equal_the_cli_images(client, cli_images):
    def request(i):
        prompt, seed = REQUESTS[i]
        return generate(client, prompt=prompt, seed=seed)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(request, range(len(REQUESTS))))
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["data"]) == 1 and body["data"][0]["seed"] == REQUESTS[i][1]
        assert body["size"] == "128x128" and body["num_inference_steps"] == STEPS
        assert body["inference_time_s"] > 0 and set(body) >= {"created", "peak_memory_mb"}
        timing = dict(entry.split(";dur=") for entry in response.headers["server-timing"].split(", "))
        assert list(timing) == ["read", "submit", "queue", "inference", "steps", "engine", "encode", "render",
                                "total"]
        assert abs(float(timing["inference"]) - 1e3 * body["inference_time_s"]) < 0.2
        assert 0 < float(timing["steps"]) < float(timing["inference"]) < float(timing["total"])
        image = decode(body["data"][0])
        assert image.format == "PNG"
        meta = image.text
        assert meta["prompt"] == REQUESTS[i][0] and meta["seed"] == str(REQUESTS[i][1])
        assert meta["steps"] == str(STEPS) and "EP=2" in meta["parallel_layout"]
        diff = np.abs(np.asarray(image).astype(int) - cli_images[i]).max()
        assert diff <= 1, f"request {i} differs from epdiff generate's image by {diff} levels"


@pytest.mark.parametrize("body,param,words", [
    ({}, "prompt", "prompt is required"),
    ({"prompt": "   "}, "prompt", "prompt is empty: '   '"),
    ({"prompt": 7}, "prompt", "prompt must be a string, got int 7"),
    ({"prompt": "1" * 13_000}, "prompt", "over the model's context of 12800"),  # a token per digit
    ({"prompt": "x" * 20_001}, "prompt", "prompt is 20001 characters, over this server's limit of 20000 "
                                         "(--max-prompt-chars)"),
    ({"prompt": [1, 2]}, "prompt", "prompt must be a string, got list [1, 2]"),
    ({"prompt": "a red \ud800 circle"}, "prompt", "character 6 is a lone surrogate"),
    ({"prompt": "x", "n": 0}, "n", "got 0"),
    ({"prompt": "x", "n": "2"}, "n", "got '2'"),
    ({"prompt": "x", "n": 11}, "n", "n must be at most 10 on this server (--max-images), got 11"),
    ({"prompt": "x", "num_inference_steps": 100_000}, "num_inference_steps",
     "at most 200 on this server (--max-inference-steps), got 100000"),
    ({"prompt": "x", "size": "9" * 5000 + "x128"}, "size", "size must be 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "guidance_scale": 1e300}, "guidance_scale", "must be in [0, 100], got 1e+300"),
    ({"prompt": "x", "size": "big"}, "size", "got 'big'"),
    ({"prompt": "x", "size": "1024x100"}, "size", "size '1024x100' (width x height)"),
    ({"prompt": "x", "size": "0x128"}, "size", "width must be a positive number"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "at least 1, got 0"),
    ({"prompt": "x", "num_inference_steps": 2.5}, "num_inference_steps", "got 2.5"),
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "must be in [0, 100], got -1"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale", "got 'high'"),
    ({"prompt": "x", "seed": "abc"}, "seed", "got 'abc'"),
    ({"prompt": "x", "seed": 2**64}, "seed", f"got {2**64}"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "'url' is not supported"),
    ({"prompt": "x", "output_format": "gif"}, "output_format", "got 'gif'"),
    ({"prompt": "x", "steps": 3}, "steps", "unknown field 'steps'"),
    ({"prompt": "x", "cache": "teacache"}, "cache", "cache 'teacache' is not one epdiff has"),
    ({"prompt": "x", "cache": {"kind": "taylor", "interval": 0}}, "cache", "interval must be a positive integer"),
    ({"prompt": "x", "cache": {"depth": 2}}, "cache", "unknown field 'depth'"),
    ({"prompt": "x", "cache": 5}, "cache", "got 5"),
])
def test_bad_request_gets_400_naming_the_field_and_value(client, body, param, words):
    # json.dumps escapes what httpx would refuse to encode (a lone surrogate), as a client may send it.
    response = client.post(GENERATE, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert words in error["message"], error["message"]


def test_an_openai_client_body_with_nulls_and_presets_is_served(client):
    body = {"prompt": "a large red circle on the left", "num_inference_steps": STEPS, "seed": 4, "n": None,
            "response_format": None, "output_format": None, "size": None, "quality": "standard", "style": "vivid",
            "model": "any", "user": "u"}
    response = client.post(GENERATE, json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


@pytest.mark.parametrize("content", [b"not json", b"[1, 2]"])
def test_a_body_that_is_not_a_json_object_gets_400(client, content):
    response = client.post(GENERATE, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_request_chooses_its_step_cache_and_each_image_says_how_many_steps_ran(client):
    body = generate(client, prompt=PROMPTS[0], seed=5, num_inference_steps=20, cache="taylor").json()
    assert body["cache"] == "taylor (interval 5, order 1)" and body["data"][0]["full_steps"] == 7
    assert decode(body["data"][0]).info["full_steps"] == "7"
    body = generate(client, prompt=PROMPTS[0], seed=5, num_inference_steps=20,
                    cache={"kind": "fbcache", "threshold": 1e-9}).json()
    assert body["data"][0]["full_steps"] == 20  # nothing changes that little: every step ran
    assert generate(client, prompt=PROMPTS[0], num_inference_steps=4).json()["cache"] == "none"


def test_output_formats_and_several_images(client):
    body = generate(client, prompt=PROMPTS[0], seed=5, n=2, output_format="jpeg").json()
    assert [item["seed"] for item in body["data"]] == [5, 6] and body["output_format"] == "jpeg"
    assert all(decode(item).format == "JPEG" for item in body["data"])
    body = generate(client, prompt=PROMPTS[0], output_format="webp", size="128x128").json()
    assert decode(body["data"][0]).format == "WEBP" and isinstance(body["data"][0]["seed"], int)


def test_progress_follows_the_steps(client):
    steps, seen, again = 8, [], []
    done = threading.Event()

    def poll():
        while not done.is_set():
            response = client.get("/v1/images/progress/p1")
            if response.status_code == 200:
                seen.append(response.json())
                if seen[-1]["status"] in ("queued", "running") and not again:  # its id, not finished: refused
                    again.append(client.post(GENERATE, json={"prompt": "x"}, headers={"X-Request-ID": "p1"}))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        response = client.post(GENERATE, json={"prompt": PROMPTS[1], "num_inference_steps": steps},
                               headers={"X-Request-ID": "p1"})
    finally:
        done.set()
        poller.join()
    assert response.status_code == 200 and response.headers["x-request-id"] == "p1"
    assert again and again[0].status_code == 409 and "has not finished" in again[0].json()["error"]["message"]
    assert client.get("/v1/images/progress/p1").json() == {"status": "done", "step": steps, "steps": steps}
    running = [p["step"] for p in seen if p["status"] == "running"]
    assert running and running == sorted(running) and max(running) <= steps
    assert client.get("/v1/images/progress/nobody").status_code == 404
    assert client.post(GENERATE, json={"prompt": "x"}, headers={"X-Request-ID": "a b"}).status_code == 400


def test_full_queue_gets_429(client, server):
    # Max queue 4: with two requests running (one per DP group), the fifth waiting one is refused.
    def request(i):
        return client.post(GENERATE, json={"prompt": f"{PROMPTS[i % 4]} number {i}", "num_inference_steps": 6})

    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(request, range(10)))
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 429} and codes.count(200) >= 4, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"


def test_a_client_that_disconnects_does_not_break_the_engine(client, server):
    # The first runs when its client leaves, the other two are still waiting: they are dropped.
    timeouts = []

    def impatient(prompt):
        try:
            httpx.post(server.url + GENERATE, json={"prompt": prompt, "num_inference_steps": 100}, timeout=0.5)
        except httpx.ReadTimeout:
            timeouts.append(prompt)

    threads = [threading.Thread(target=impatient, args=(prompt,)) for prompt in PROMPTS[:3]]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(timeouts) == 3
    deadline = time.time() + 5
    while metric(client, "epdiff_requests_unfinished") > 1 and time.time() < deadline:
        time.sleep(0.1)
    assert metric(client, "epdiff_requests_unfinished") <= 1, "the waiting requests of gone clients were kept"
    response = generate(client, prompt=PROMPTS[2], seed=1)
    assert response.status_code == 200
    assert client.get("/health").status_code == 200
    assert metric(client, "epdiff_requests_unfinished") == 0


def test_metrics(client):
    text = client.get("/metrics").text
    assert metric(client, "epdiff_requests_total", '{status="200"}') >= len(REQUESTS) + 5
    assert metric(client, "epdiff_requests_total", '{status="400"}') >= 18
    assert metric(client, "epdiff_requests_total", '{status="429"}') >= 1
    assert metric(client, "epdiff_images_total") >= len(REQUESTS) + 4
    assert metric(client, "epdiff_queue_depth") == 0 and metric(client, "epdiff_healthy") == 1
    assert metric(client, "epdiff_step_seconds_count") >= STEPS * len(REQUESTS) / 4  # batches share steps
    for name in ("epdiff_request_latency_seconds_bucket", "epdiff_request_inference_seconds_sum",
                 "epdiff_request_queue_seconds_count"):
        assert name in text


def start_request(url: str, body: dict, results: dict, key: str, request_id: str | None = None):
    def run():
        headers = {"X-Request-ID": request_id} if request_id else {}
        try:
            results[key] = httpx.post(url + GENERATE, json=body, headers=headers, timeout=120)
        except httpx.TransportError as e:
            results[key] = e
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_running(url: str, request_id: str, timeout_s: float = 60):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        response = httpx.get(f"{url}/v1/images/progress/{request_id}")
        if response.status_code == 200 and response.json()["status"] == "running":
            return
        time.sleep(0.05)
    raise AssertionError(f"request {request_id} did not start")


def test_a_killed_worker_fails_waiting_requests_and_the_server_exits(tmp_path):
    s = ServerProcess(LAYOUT, tmp_path / "server.log")
    try:
        s.wait_healthy()
        workers = s.workers()
        assert len(workers) == 2, s.children()
        results, threads = {}, []
        threads.append(start_request(s.url, {"prompt": PROMPTS[0], "num_inference_steps": 200}, results, "running",
                                     "k1"))
        wait_running(s.url, "k1")
        threads.append(start_request(s.url, {"prompt": PROMPTS[1], "num_inference_steps": 200, "n": 3}, results,
                                     "waiting"))
        time.sleep(0.5)
        killed_at = time.time()
        os.kill(workers[1], signal.SIGKILL)
        health = []
        while s.process.poll() is None and time.time() - killed_at < 30:
            try:
                health.append(httpx.get(f"{s.url}/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert 503 in health, health
        assert s.process.wait(30) == 1, s.log()
        for thread in threads:
            thread.join(30)
        for key in ("running", "waiting"):
            response = results[key]
            assert response.status_code == 503, (key, response)
            assert "worker rank 1 died (signal SIGKILL)" in response.json()["error"]["message"]
        assert "worker rank 1 died" in s.log()
        assert not [p for p in workers if alive(p)], "a worker outlived the server"
    finally:
        s.stop()


def test_sigterm_finishes_the_request_in_flight_and_exits(tmp_path):
    s = ServerProcess([*LAYOUT, "--shutdown-timeout", "60"], tmp_path / "server.log")
    try:
        s.wait_healthy()
        workers = s.workers()
        results, threads = {}, []
        threads.append(start_request(s.url, {"prompt": PROMPTS[0], "num_inference_steps": 10}, results, "running",
                                     "t1"))
        wait_running(s.url, "t1")
        threads.append(start_request(s.url, {"prompt": PROMPTS[1], "num_inference_steps": 10}, results, "waiting"))
        time.sleep(0.3)
        s.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            late = httpx.post(s.url + GENERATE, json={"prompt": "x", "num_inference_steps": 1}, timeout=30)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass  # already gone: refused either way
        assert s.process.wait(90) == 0, s.log()
        for thread in threads:
            thread.join(30)
        assert results["running"].status_code == 200, results["running"].text
        assert results["waiting"].status_code == 503, results["waiting"].text
        assert "closed before this request started" in results["waiting"].json()["error"]["message"]
        assert not [p for p in workers if alive(p)], "a worker outlived the server"
    finally:
        s.stop()


def test_the_server_runs_under_torchrun(tmp_path):
    """Every rank runs `epdiff serve`: rank 0 answers HTTP, rank 1 serves rank 0's engine. A
    SIGTERM to torchrun's agent (which reports it as its own failure) leaves no process behind."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    s = ServerProcess(["-tp", "2", "--enable-expert-parallel"], tmp_path / "server.log", launcher=torchrun)
    try:
        s.wait_healthy()
        r = httpx.post(f"{s.url}/v1/images/generations", timeout=120,
                       json={"prompt": "a large red circle on the left", "num_inference_steps": 3, "seed": 1})
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert image.size == (128, 128) and image.text["seed"] == "1"
        ranks = s.children()
        s.process.send_signal(signal.SIGTERM)
        s.process.wait(60)
        deadline = time.time() + 15
        while any(alive(p) for p in ranks) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in ranks), s.log()[-2000:]
    finally:
        s.stop()


@pytest.mark.parametrize("item", [{}, {"seed": 3, "full_steps": 8, "revised_prompt": 'a "quoted"\nline ünï'}])
def test_the_answer_renders_as_json_with_its_images_put_in_whole(item):
    b64 = base64.b64encode(bytes(range(256)) * 50).decode()
    answer = {"created": 1, "data": [{"b64_json": b64, **item}, {"b64_json": "", **item}], "cot_text": None,
              "usage": {"total_tokens": 7}, "size": "1024x1024"}
    content = render_answer(answer)
    assert json.loads(content) == answer
    assert render_answer({"data": []}) == b'{"data":[]}'
    event = {"type": "image_generation.completed", "b64_json": b64, "data": "not a list of items", **item}
    assert json.loads(server_sent_event(event).decode().split("data: ", 1)[1]) == event
