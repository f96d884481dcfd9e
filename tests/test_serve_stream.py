"""Streamed image requests (`stream: true`, OpenAI's image stream events) and the text a model writes
before it draws, on in-process servers (CPU, one rank): a tiny Instruct-Distil checkpoint that
writes, and the built-in base model. The events' order and shapes on the wire, the previews'
count, refusals before the stream, a client that leaves mid-stream, a stream past its deadline,
and OpenAI's client reading both endpoints' streams."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image

from epdiff.engine import EngineConfig
from epdiff.engine.denoise import preview_steps
from instruct_cases import input_image, make_checkpoint
from serve_helpers import InProcessServer, metric

GENERATE, EDITS = "/v1/images/generations", "/v1/images/edits"
# The tiny checkpoint's random weights write random words; sampled (seed 2), they fill the budget.
WRITING = {"task": "think_recaption", "max_new_tokens": 4, "temperature": 1.0, "top_k": 0, "seed": 2,
           "size": "128x128", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    # 128² images: the VAE's decode, of each preview too, is most of a request's time on the CPU
    folder = make_checkpoint(str(tmp_path_factory.mktemp("distil")), "instruct-distil", image_base_size=128)
    with InProcessServer(EngineConfig(model=folder)) as server:
        yield server


@pytest.fixture(scope="module")
def base():
    with InProcessServer(EngineConfig()) as server:
        yield server


def events(response) -> list[dict]:
    """The SSE messages of a streamed answer, each checked: its `event:` is its data's type."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for message in response.read().decode().split("\n\n"):
        if not message:
            continue
        lines = dict(line.split(": ", 1) for line in message.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"], message[:200]
        out.append(data)
    return out


def stream(server, body: dict, path: str = GENERATE, **kwargs) -> list[dict]:
    with httpx.stream("POST", server.url + path, json={"stream": True, **body}, timeout=120, **kwargs) as response:
        return events(response)


def image(b64_json: str) -> Image.Image:
    decoded = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    decoded.load()
    return decoded


def test_the_text_then_the_previews_then_the_image(instruct):
    got = stream(instruct, {"prompt": "a red circle", "partial_images": 1, **WRITING},
                 headers={"X-Request-ID": "s1"})
    kinds = [event["type"].removeprefix("image_generation.") for event in got]
    deltas = kinds.count("text_delta")
    assert deltas >= 2 and kinds == ["text_delta"] * deltas + ["partial_image", "completed"], kinds
    written = "".join(event["delta"] for event in got[:deltas])
    partial, completed = got[-2:]
    assert completed["cot_text"] and written.startswith(completed["cot_text"]), (written, completed["cot_text"])
    for event in (partial, completed):
        assert event["size"] == "128x128" and event["output_format"] == "png" and event["image_index"] == 0
        assert event["quality"] == "auto" and event["background"] == "opaque" and event["created_at"] > 0
        assert image(event["b64_json"]).size == (128, 128)
    assert partial["partial_image_index"] == 0
    assert completed["seed"] == 2 and completed["num_inference_steps"] == 2
    usage = completed["usage"]  # in: "a red circle"; out: the image's 8 × 8 tokens and what was written
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"] == 3
    assert usage["output_tokens"] > 64 and usage["total_tokens"] == 3 + usage["output_tokens"]
    assert "revised_prompt" not in completed
    assert image(completed["b64_json"]).text["cot_text"] == completed["cot_text"]
    assert httpx.get(f"{instruct.url}/v1/images/progress/s1").json()["status"] == "done"


def test_an_answer_not_streamed_carries_the_written_text(instruct, base):
    given = "a big red circle, centred"  # no text pass: the image is drawn from it
    body = httpx.post(instruct.url + GENERATE, timeout=120,
                      json={"prompt": "a red circle", "cot_text": given, "task": "think_recaption",
                            "num_inference_steps": 1}).json()
    assert body["cot_text"] == given and body["data"][0]["revised_prompt"] == given
    assert body["usage"]["output_tokens"] == 64  # nothing written: the image's tokens alone
    body = httpx.post(base.url + GENERATE, timeout=120, json={"prompt": "a red circle", "num_inference_steps": 1}).json()
    assert body["cot_text"] is None and "revised_prompt" not in body["data"][0]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_previews_as_asked_on_a_base_model(base, count):
    steps, n = 4, 2 if count == 1 else 1
    got = stream(base, {"prompt": "a blue square", "num_inference_steps": steps, "partial_images": count, "n": n,
                        "seed": 9})
    partials = [(e["image_index"], e["partial_image_index"]) for e in got if e["type"].endswith(".partial_image")]
    expected = len(preview_steps(steps, count))
    assert sorted(partials) == [(k, j) for k in range(n) for j in range(expected)], partials
    completed = [e for e in got if e["type"] == "image_generation.completed"]
    assert got[-n:] == completed and [e["image_index"] for e in completed] == list(range(n))
    assert [e["seed"] for e in completed] == [9 + k for k in range(n)] and completed[0]["cot_text"] is None
    assert not any(e["type"].endswith(".text_delta") for e in got)


@pytest.mark.parametrize("body,param,message", [
    ({"stream": True, "partial_images": 4}, "partial_images", "partial_images must be an integer from 0 to 3, got 4"),
    ({"stream": True, "partial_images": -1}, "partial_images", "got -1"),
    ({"stream": True, "partial_images": "2"}, "partial_images", "got '2'"),
    ({"partial_images": 1}, "partial_images", "partial_images 1 needs stream: true"),
    ({"stream": "yes"}, "stream", "stream must be true or false, got 'yes'"),
    ({"stream": True, "max_new_tokens": 5000}, "max_new_tokens", "at most 4096 on this server (--max-text-tokens), "
                                                                 "got 5000"),
    ({"stream": True, "task": "think"}, "task", "unknown task 'think' for this model; it does: image"),
    ({"stream": True, "cot_text": "a circle"}, "cot_text", "this model writes none"),
])
def test_a_bad_stream_request_gets_400_before_any_event(base, body, param, message):
    response = httpx.post(base.url + GENERATE, json={"prompt": "x", **body})
    assert response.status_code == 400 and response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_a_client_that_leaves_mid_stream_frees_its_slot(base):
    steps, refused = 40, metric(httpx.Client(base_url=base.url), "epdiff_requests_total", '{status="499"}')
    with httpx.stream("POST", base.url + GENERATE, headers={"X-Request-ID": "gone"}, timeout=120,
                      json={"prompt": "a green triangle", "num_inference_steps": steps, "partial_images": 3,
                            "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("event: image_generation.partial_image"):
                break  # leaves after the first preview: the connection closes
    deadline = time.time() + 10
    while httpx.get(f"{base.url}/v1/images/progress/gone").json()["status"] == "running" and time.time() < deadline:
        time.sleep(0.05)
    progress = httpx.get(f"{base.url}/v1/images/progress/gone").json()
    assert progress["status"] == "failed" and progress["step"] < steps, progress  # abandoned, its batch stopped
    with httpx.Client(base_url=base.url) as client:
        assert metric(client, "epdiff_requests_unfinished") == 0
        assert metric(client, "epdiff_requests_total", '{status="499"}') == refused + 1
    assert stream(base, {"prompt": "a green triangle", "num_inference_steps": 1})[-1]["type"].endswith("completed")


def test_a_stream_past_its_deadline_ends_with_an_error_event():
    with InProcessServer(EngineConfig(), request_timeout=1.0) as server:
        start = time.time()
        got = stream(server, {"prompt": "a red circle", "num_inference_steps": 200})
        assert got == [{"type": "error", "error": {
            "message": "the request took longer than this server's 1 s (--request-timeout)", "type": "server_error",
            "param": None, "code": "timeout"}}]
        assert time.time() - start < 5
        with pytest.raises(openai.APIError, match="--request-timeout"):
            api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
            list(api.images.generate(model="m", prompt="x", stream=True, extra_body={"num_inference_steps": 200}))


def png(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_openai_clients_streams_of_both_endpoints(instruct):
    api = openai.OpenAI(base_url=instruct.url + "/v1", api_key="none", max_retries=0)
    extra = {key: value for key, value in WRITING.items() if key != "size"}
    got = list(api.images.generate(model="tiny", prompt="a red circle", size="128x128", stream=True, partial_images=1,
                                   extra_body=extra))
    assert [e.type for e in got][-2:] == ["image_generation.partial_image", "image_generation.completed"]
    assert got[0].type == "image_generation.text_delta" and got[0].delta.startswith("<think>")
    completed = got[-1]
    assert completed.cot_text and completed.size == "128x128" and completed.usage.output_tokens > 0
    assert image(completed.b64_json).size == (128, 128)
    # An edit's stream: no text pass (the checkpoint's default task), no preview (a single step has none)
    got = list(api.images.edit(image=("a.png", png(input_image("red-square")), "image/png"), prompt="make it blue",
                               stream=True, partial_images=1, extra_body={"num_inference_steps": 1, "seed": 1}))
    assert [e.type for e in got] == ["image_edit.completed"]
    assert got[0].size == "128x128" and image(got[0].b64_json).size == (128, 128) and got[0].cot_text is None


def test_answer_json_writes_encoded_images_whole_and_escapes_any_other_text():
    from epdiff.serve.api import Base64Text, json_text

    answer = {"created": 1, "b64_json": 'a "quoted"\nline\\', "data": [
        {"b64_json": Base64Text("QUJD+/=="), "seed": 3}, {"b64_json": "\ud7ff \"x\"", "seed": 4}]}
    text = json_text(answer)
    assert json.loads(text) == answer and '"b64_json":"QUJD+/=="' in text
