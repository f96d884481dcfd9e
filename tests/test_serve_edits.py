"""`POST /v1/images/edits` (OpenAI's multipart form) on a running `epdiff serve` with a small
Instruct-Distil checkpoint: the edit's image is the Python API's, OpenAI's client can call it, and
bad forms get 4xx naming the field before any compute."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from epdiff.engine import ImageGenerator
from instruct_cases import input_image, make_checkpoint
from serve_helpers import healthy_server

EDITS = "/v1/images/edits"
STEPS = 2


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("distil")), "instruct-distil")


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    with healthy_server(["--model", folder, "--max-upload-bytes", str(1 << 20)],
                        tmp_path_factory.mktemp("serve") / "server.log") as s:
        yield s


def decoded(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))


def test_an_edit_is_the_python_apis_image(client, folder):
    wide = input_image("wide-circle")
    response = client.post(EDITS, files={"image": ("wide.png", png(wide), "image/png")},
                           data={"prompt": "make it blue", "seed": "7", "num_inference_steps": str(STEPS)})
    body = response.json()
    assert body["size"] == "320x192"  # the input's own bucket (width x height)
    with ImageGenerator(folder) as generator:
        expected = np.asarray(generator.generate("make it blue", images=[wide], seed=7,
                                                 num_inference_steps=STEPS)[0])
    assert np.array_equal(decoded(response), expected)


def test_openai_clients_edit_call_with_two_images(server):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    result = api.images.edit(image=[("a.png", png(input_image("red-square")), "image/png"),
                                    ("b.png", png(input_image("wide-circle")), "image/png")],
                             prompt="put the circle on the square", size="256x256",
                             extra_body={"num_inference_steps": STEPS, "seed": 1})
    assert result.data[0].b64_json and result.size == "256x256"


@pytest.mark.parametrize("files, data, status, message", [
    ({}, {"prompt": "x"}, 400, "an edit needs at least one image"),
    ({"image": ("a.txt", b"no image here", "text/plain")}, {"prompt": "x"}, 400, "image 0 is not an image"),
    ({"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")}, {"prompt": "x", "n": "two"}, 400,
     "n must be an integer, got 'two'"),
    ({"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")}, {"prompt": "x", "solver": "rk9"}, 400,
     "unknown solver 'rk9'"),
    ({"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")}, {"prompt": "x", "colour": "red"}, 400,
     "unknown field 'colour'"),
    ({"image": ("big.bin", bytes(2 << 20), "application/octet-stream")}, {"prompt": "x"}, 413,
     "over this server's limit"),
    ({"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")}, {"prompt": "x", "cache": "{" * 100_000},
     400, "cache is not a kind or a JSON object"),
    ({"image": ("a.png", png(Image.new("RGB", (64, 64))), "image/png")},
     {"prompt": "x", "cache": '{"interval": ' + "9" * 5000 + "}"}, 400, "cache is not a kind or a JSON object"),
])
def test_bad_forms_are_refused_naming_the_field(client, files, data, status, message):
    response = client.post(EDITS, files=files or None, data=data)
    if not files:  # httpx sends a url-encoded form without files
        assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]["message"]
        response = client.post(EDITS, files={"prompt": (None, "x")})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


def test_five_images_a_json_body_and_broken_forms_are_refused(client):
    image = ("a.png", png(Image.new("RGB", (32, 32))), "image/png")
    response = client.post(EDITS, files=[("image[]", image)] * 5, data={"prompt": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    response = client.post(EDITS, json={"prompt": "x"})
    assert response.status_code == 415
    response = client.post(EDITS, content=b"--b\r\nno headers, no end", headers={
        "Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "not a multipart form" in response.json()["error"]["message"]
    many = [("image[]", image)] * 12  # past the parser's own file limit, before any image is decoded
    response = client.post(EDITS, files=many, data={"prompt": "x"})
    assert response.status_code == 400, response.text
