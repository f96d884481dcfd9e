"""`epdiff serve` against careless and hostile clients (CPU, the built-in model, DP2 + EP, as a
subprocess): an API key, the Content-Type rule, the body limit, malformed JSON, routes that do not
exist, the OpenAI client, and requests abandoned by their client or their deadline, whose batch
stops at the next step so that the next request is served at once. After each, the server is
healthy."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from serve_helpers import healthy_server, metric

KEY = "not-a-real-key"
GENERATE = "/v1/images/generations"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    flags = ["-dp", "2", "--enable-expert-parallel", "--api-key", KEY, "--max-body-bytes", "300000",
             "--request-timeout", "3", "--body-timeout", "1"]
    with healthy_server(flags, tmp_path_factory.mktemp("serve") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    body = response.json()["error"]
    assert body["code"] == code and body["message"] and body["type"], body
    return body


def healthy(client) -> None:
    assert client.get("/health").status_code == 200


def test_without_the_key_only_the_probes_and_the_page_answer(server):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", GENERATE),
                             ("GET", "/v1/images/progress/x"), ("GET", "/v1/models/tiny-hunyuan-image3")]:
            body = error(anonymous.request(method, path, json={"prompt": "x"}), 401, "invalid_api_key")
            assert "no API key" in body["message"], body
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert "a wrong API key" in error(wrong, 401, "invalid_api_key")["message"]
        for path in ("/health", "/ready", "/"):
            assert anonymous.get(path).status_code == 200, path


def test_only_json_bodies_are_read(client):
    for headers in ({"Content-Type": "text/plain"}, {}, {"Content-Type": "multipart/form-data; boundary=x"}):
        response = client.post(GENERATE, content=json.dumps({"prompt": "x"}), headers=headers)
        assert "Content-Type must be application/json" in error(response, 415, "unsupported_media_type")["message"]
    charset = client.post(GENERATE, content=json.dumps({"prompt": "x", "num_inference_steps": 0}),
                          headers={"Content-Type": "application/json; charset=utf-8"})
    error(charset, 400, "invalid_value")  # read, then refused for its steps
    healthy(client)


def test_a_body_over_the_limit_gets_413_declared_or_streamed(client):
    big = json.dumps({"prompt": "x" * 400_000}).encode()
    body = error(client.post(GENERATE, content=big, headers={"Content-Type": "application/json"}), 413,
                 "request_too_large")
    assert "--max-body-bytes" in body["message"] and "300000" in body["message"]

    def chunks():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 50_000):
            yield big[i:i + 50_000]

    error(client.post(GENERATE, content=chunks(), headers={"Content-Type": "application/json"}), 413,
          "request_too_large")
    healthy(client)


@pytest.mark.parametrize("raw, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"prompt": "x", "seed": ' + "7" * 5000 + "}", "integer string conversion"),
    ('{"prompt": "x", "size": "' + "9" * 5000 + 'x128"}', "size must be 'WIDTHxHEIGHT'"),
    ("{'prompt': 'x'}", "not valid JSON"),
    ('{"prompt": "x", "output_format": ["png"]}', "output_format must be one of"),
    ('{"prompt": "x", "system_prompt": "\\ud800 hi"}', "system_prompt is not valid text: character 0 is a lone "
                                                       "surrogate"),
])
def test_malformed_bodies_get_400(client, raw, words):
    response = client.post(GENERATE, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
    healthy(client)


def test_a_body_that_trickles_in_gets_408_and_frees_its_connection(server):
    """A client that declares a body and sends a byte now and then is cut off at --body-timeout."""
    import socket
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {GENERATE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
        start = time.monotonic()
        answer = b""
        for _ in range(8):  # a byte every 0.3 s: the body never completes
            time.sleep(0.3)
            try:
                sock.sendall(b" ")
            except OSError:  # the server has answered and closed
                break
        sock.settimeout(3)
        while chunk := sock.recv(65536):  # to the end: the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"did not all arrive within 1 s" in answer and time.monotonic() - start < 5


def test_routes_and_methods_that_do_not_exist_answer_in_the_openai_shape(client):
    assert "no route '/v1/nothing'" in error(client.get("/v1/nothing"), 404, "not_found")["message"]
    assert "GET is not allowed" in error(client.get(GENERATE), 405, "method_not_allowed")["message"]


def test_the_openai_client_lists_and_retrieves_the_model(server):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in api.models.list().data] == ["tiny-hunyuan-image3"]
    assert api.models.retrieve("tiny-hunyuan-image3").id == "tiny-hunyuan-image3"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-image-1")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_request_past_its_deadline_gets_504_and_its_batch_stops(client):
    before = metric(client, "epdiff_step_seconds_count")
    start = time.time()
    long = client.post(GENERATE, json={"prompt": "a small red circle on the left", "num_inference_steps": 200})
    waited = time.time() - start
    body = error(long, 504, "timeout")
    assert "--request-timeout" in body["message"] and 3 <= waited < 8, waited
    # The batch stopped at its next step: the next request runs at once.
    start = time.time()
    quick = client.post(GENERATE, json={"prompt": "a large blue square at the top", "num_inference_steps": 2})
    assert quick.status_code == 200 and quick.json()["queue_time_s"] < 1.0, quick.json()
    assert time.time() - start < 3
    assert "batch" not in client.get("/health").json()
    assert metric(client, "epdiff_step_seconds_count") > before  # steps of a request that failed are counted too


def test_a_long_request_whose_client_left_stops_and_frees_the_engine(server, client):
    def leave():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + GENERATE, headers=AUTH, timeout=1.0,
                       json={"prompt": "a small green triangle on the right", "num_inference_steps": 200})

    thread = threading.Thread(target=leave)
    thread.start()
    thread.join()
    deadline = time.time() + 3  # its batch stops at the next step once the server sees the client gone
    while "batch" in client.get("/health").json() and time.time() < deadline:
        time.sleep(0.05)
    assert "batch" not in client.get("/health").json()
    assert client.get("/ready").json() == {"status": "ready"}
    quick = client.post(GENERATE, json={"prompt": "a large yellow circle at the bottom", "num_inference_steps": 2})
    assert quick.status_code == 200 and quick.json()["queue_time_s"] < 1.0


def test_a_busy_server_says_how_old_its_batch_is(client):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", client.post(
        GENERATE, json={"prompt": "a small purple square on the left", "num_inference_steps": 24})))
    thread.start()
    deadline = time.time() + 5
    seen = None
    while time.time() < deadline and seen is None:
        seen = client.get("/health").json().get("batch")
        time.sleep(0.05)
    thread.join()
    assert seen is not None and seen["running_s"] >= seen["since_last_step_s"] >= 0, seen
    assert result["r"].status_code == 200
    gauge = [line for line in client.get("/metrics").text.splitlines()
             if line.startswith("epdiff_batch_running_seconds ")]
    assert gauge == ["epdiff_batch_running_seconds 0.0"]


def test_cors_is_off_unless_origins_are_allowed_and_the_key_may_come_from_the_environment(monkeypatch):
    from fastapi.testclient import TestClient

    from epdiff.engine import EngineConfig
    from epdiff.serve.app import create_app
    from epdiff.serve.config import ServerConfig
    from epdiff.serve.service import EngineService

    monkeypatch.setenv("EPDIFF_API_KEY", "from-env")
    config = EngineConfig().resolve()
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    for origins, allowed in ((None, None), ("https://a.example, https://b.example", "https://a.example")):
        server = ServerConfig(allowed_origins=origins).resolve()
        assert server.api_key == "from-env"
        with TestClient(create_app(EngineService(config, 4), server)) as client:
            assert client.options(GENERATE, headers=preflight).headers.get("access-control-allow-origin") == allowed
            assert client.get("/v1/models").status_code == 401
            assert client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_two_ctrl_c_during_a_request_answer_it_with_503(tmp_path):
    import signal

    from serve_helpers import ServerProcess

    server = ServerProcess(["-dp", "2", "--enable-expert-parallel"], tmp_path / "server.log")
    try:
        server.wait_healthy()
        answer = {}

        def long_request():
            answer["r"] = httpx.post(server.url + GENERATE, timeout=60,
                                     json={"prompt": "a small red circle on the left", "num_inference_steps": 150})

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.5)
        server.process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGINT)
        thread.join(60)
        assert "the server shut down" in error(answer["r"], 503, "service_unavailable")["message"]
        assert server.process.wait(30) == 0
    finally:
        server.stop()
