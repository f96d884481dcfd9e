"""The HTTP routes: the OpenAI image endpoint, models, health, metrics, progress and the page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import time
from typing import Callable

from concurrent.futures import CancelledError

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from ..engine import EngineDeadError, ImageFailedError, QueueFullError
from ..engine.engine import PartialImage, RequestAbandonedError, RequestFailedError, TextDelta
from .api import (ApiError, GenerationRequest, bad_request, completed_events, encode_image, encode_images, error_event,
                  generation_response, parse_edit, parse_generation, partial_image_event, render_answer,
                  server_sent_event, text_delta_event)
from .config import ServerConfig
from .service import EngineService, ProgressIdInUse

log = logging.getLogger("epdiff.serve")

STATIC = os.path.join(os.path.dirname(__file__), "static")
PROGRESS_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How often a waiting request looks whether its client is gone or the engine was closed.
WAIT_POLL_S = 0.5
WATCH_S = 0.2  # how often the engine's health is looked at
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
STATUSES = ("200", "400", "401", "408", "409", "413", "415", "429", "499", "500", "503", "504")
# Routes open without the API key: the probes, and the page (it holds no data; its requests carry
# the key its user types).
OPEN_PATHS = ("/health", "/ready", "/")


class Metrics:
    def __init__(self, service: EngineService):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("epdiff_requests", "Image generation requests by HTTP status", ["status"],
                                registry=registry)
        for status in STATUSES:
            self.requests.labels(status)
        self.images = Counter("epdiff_images", "Images generated and returned", registry=registry)
        self.latency = Histogram("epdiff_request_latency_seconds", "Image generation request latency, end to end",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.inference = Histogram("epdiff_request_inference_seconds",
                                   "Denoising and decoding time of a request's batches", buckets=LATENCY_BUCKETS,
                                   registry=registry)
        self.queue = Histogram("epdiff_request_queue_seconds", "Time from submission to a request's first batch",
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.steps = Histogram("epdiff_step_seconds", "Denoising step time (rank 0)", buckets=STEP_BUCKETS,
                               registry=registry)
        engine = lambda: service.engine  # noqa: E731
        Gauge("epdiff_queue_depth", "Requests waiting for their first batch", registry=registry).set_function(
            lambda: engine().num_waiting if engine() is not None else 0)
        Gauge("epdiff_requests_unfinished", "Requests submitted and not finished", registry=registry).set_function(
            lambda: engine().num_unfinished if engine() is not None else 0)
        Gauge("epdiff_healthy", "1 when the model is loaded and every worker is alive", registry=registry
              ).set_function(lambda: float(service.healthy))
        Gauge("epdiff_batch_running_seconds", "How long the batch in flight has run (0: none)", registry=registry
              ).set_function(lambda: batch_age(0))
        Gauge("epdiff_batch_since_last_step_seconds", "Seconds since the batch in flight finished a step (0: none)",
              registry=registry).set_function(lambda: batch_age(1))

        def batch_age(which: int) -> float:
            age = engine().batch_age if engine() is not None else None
            return 0.0 if age is None else age[which]

        self._steps_lock = threading.Lock()
        self._steps_seen = 0

    def observe_steps(self, service: EngineService) -> None:
        """Rank 0's steps since the last look, each counted once (a batch serves several requests)."""
        with self._steps_lock:
            metrics = service.engine.rank_metrics[0]
            new = metrics["steps_total"] - self._steps_seen
            for seconds in metrics["step_seconds"][-new:] if new > 0 else []:
                self.steps.observe(seconds)
            self._steps_seen = metrics["steps_total"]


def create_app(service: EngineService, server: ServerConfig | None = None, *,
               on_engine_dead: Callable[[], None] = lambda: None) -> FastAPI:
    server = server or ServerConfig().resolve()
    metrics = Metrics(service)
    layout = service.config.parallel.describe()
    model_name = os.path.basename(os.path.normpath(service.config.model))
    created = int(time.time())
    with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
        page = f.read()

    async def watch():
        while True:
            await asyncio.sleep(WATCH_S)
            if service.check() or service.state == "dead":
                on_engine_dead()
                return

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        watcher = asyncio.create_task(watch())
        yield
        watcher.cancel()
        await asyncio.to_thread(service.close, server.shutdown_timeout)

    async def require_api_key(request: Request):
        # A dependency, not an HTTP middleware: Starlette's middleware would hide a client's
        # disconnect from the request it wraps.
        if server.api_key is None or request.url.path in OPEN_PATHS:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            what = "no API key" if not given else "a wrong API key"
            raise ApiError(401, f"this server needs an API key: the request has {what} (send 'Authorization: "
                                "Bearer KEY')", None, "invalid_api_key")

    app = FastAPI(title="epdiff", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(require_api_key)])
    if server.origins:
        app.add_middleware(CORSMiddleware, allow_origins=server.origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: f"no route {request.url.path!r}", 405: f"{request.method} is not allowed on {request.url.path!r}"}
        return error_response(ApiError(e.status_code, message.get(e.status_code, str(e.detail)), None,
                                       codes.get(e.status_code, "http_error")), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(bad_request(None, f"malformed request: {e.errors()[0].get('msg', e)}"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        """Liveness: 200 while the model is loaded and every worker is alive (503 while loading,
        and once a worker died). Says how old the running batch is and its last step."""
        if not service.healthy:
            return JSONResponse({"status": service.state, "error": service.unavailable_reason()}, status_code=503)
        body = {"status": "ok"}
        age = service.engine.batch_age
        if age is not None:
            body["batch"] = {"running_s": round(age[0], 3), "since_last_step_s": round(age[1], 3)}
        return body

    @app.get("/ready")
    async def ready():
        """Readiness: 200 when a request sent now is taken (loaded, alive, not draining, room in the queue)."""
        reason = service.not_ready_reason()
        if reason is None:
            return {"status": "ready"}
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "epdiff",
                "parallel_layout": layout, **service.config.model_info.describe()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error_response(ApiError(404, f"no model {model_id!r}; this server serves {model_name!r}",
                                           "model", "model_not_found"))
        return model_card()

    @app.get("/metrics")
    async def prometheus():
        metrics.observe_steps(service)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/images/progress/{progress_id}")
    async def progress(progress_id: str):
        entry = service.progress.get(progress_id)
        if entry is None:
            return error_response(ApiError(404, f"no request with id {progress_id!r}", "progress_id", "not_found"))
        return entry

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        return await answer(request, edit=False)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await answer(request, edit=True)

    async def answer(request: Request, edit: bool):
        start = time.perf_counter()
        headers = {}
        try:
            parsed, headers = await read_request(request, edit)
            if parsed.stream:  # from here on, the stream counts its own outcome
                return await start_stream(request, parsed, headers, edit, start)
            parsed_at = time.perf_counter()
            future = await submit(parsed, headers)
            submitted_at = time.perf_counter()
            output = await wait_for(future, request)
            finished_at = time.perf_counter()
            answer = await respond(output, parsed)
            encoded_at = time.perf_counter()
            content = render_answer(answer)
            rendered_at = time.perf_counter()
            timing = server_timing(read=parsed_at - start, submit=submitted_at - parsed_at, queue=output.queue_seconds,
                                   inference=output.inference_seconds, steps=sum(output.step_seconds),
                                   engine=finished_at - submitted_at - output.queue_seconds - output.inference_seconds,
                                   encode=encoded_at - finished_at, render=rendered_at - encoded_at,
                                   total=rendered_at - start)
            status, response = 200, Response(content, media_type="application/json",
                                             headers=headers | {"Server-Timing": timing})
        except ApiError as e:
            status, response = e.status, error_response(e, headers)
        except ClientDisconnect:  # gone while its body was read
            status, response = 499, error_response(client_gone(), headers)
        except (asyncio.CancelledError, CancelledError):  # the server is going down under this request
            status, response = 503, error_response(unavailable("the server shut down before this request "
                                                               "finished"), headers)
        except Exception as e:  # noqa: BLE001 - a bug still answers in the API's error format
            status, response = 500, error_response(internal_error(e), headers)
        count(status, start)
        return response

    def count(status: int, start: float) -> None:
        metrics.requests.labels(str(status)).inc()
        if status == 200:
            metrics.latency.observe(time.perf_counter() - start)

    async def read_request(request: Request, edit: bool) -> tuple[GenerationRequest, dict]:
        """The request read, parsed and resolved; the headers its answer carries."""
        progress_id = request.headers.get("x-request-id")
        if progress_id is not None and not PROGRESS_ID.fullmatch(progress_id):
            raise ApiError(400, f"X-Request-ID must be 1 to 64 letters, digits, '-' or '_', got {progress_id!r}",
                           None, "invalid_request_id")
        headers = {} if progress_id is None else {"X-Request-ID": progress_id}
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        expected = "multipart/form-data" if edit else "application/json"
        if content_type != expected:
            raise ApiError(415, f"Content-Type must be {expected}, got {content_type or 'none'!r}", None,
                           "unsupported_media_type")
        raw = await read_body(request, *((server.max_upload_bytes, "--max-upload-bytes") if edit
                                         else (server.max_body_bytes, "--max-body-bytes")), server.body_timeout)
        if edit:
            form = await read_form(request, raw, service.config.model_info.max_input_images)
            if await request.is_disconnected():  # gone while it uploaded: decode nothing
                raise ClientDisconnect()
            # Decoding the images, tokenizing and checking run off the event loop: /health answers meanwhile.
            parsed = await asyncio.to_thread(parse_edit, form, service.config, server)
        else:
            parsed = await asyncio.to_thread(parse_request, raw, service.config, server)
        if await request.is_disconnected():  # gone while its request was checked (threads may queue): submit nothing
            raise ClientDisconnect()
        return parsed, headers

    async def submit(parsed: GenerationRequest, headers: dict, on_event=None):
        try:  # on a thread: the engine checks the request once more (tokenizing it)
            return await asyncio.to_thread(service.submit, parsed.params, headers.get("X-Request-ID"), on_event)
        except QueueFullError as e:
            raise ApiError(429, f"the queue is full: {e}; retry later", None, "queue_full",
                           "rate_limit_exceeded") from None
        except ProgressIdInUse as e:
            raise ApiError(409, str(e), None, "request_id_in_use") from None
        except EngineDeadError as e:
            raise unavailable(str(e)) from None

    async def respond(output, parsed: GenerationRequest) -> dict:
        """A finished request's answer (its images encoded on a thread), counted in the metrics."""
        data = await asyncio.to_thread(encode_images, output, parsed.output_format)
        metrics.images.inc(len(data))
        metrics.inference.observe(output.inference_seconds)
        metrics.queue.observe(output.queue_seconds)
        tokens = service.config.model_info.image_tokens(output.params.height, output.params.width)
        return generation_response(output, data, parsed.output_format, parsed.size, tokens)

    def deadline() -> float | None:
        return time.monotonic() + server.request_timeout if server.request_timeout else None

    def given_up(future, until: float | None) -> ApiError | None:
        """Why a request not finished gets no answer: the server closed, or its time ran out (then
        it is abandoned: not started, the engine drops it; started, its batch stops at the next
        step once no request in it is wanted)."""
        if service.closed.is_set():
            return unavailable("the server shut down before this request finished")
        if until is not None and time.monotonic() > until:
            service.abandon(future)
            return ApiError(504, f"the request took longer than this server's {server.request_timeout:g} s "
                                 "(--request-timeout)", None, "timeout", "server_error")
        return None

    def result_of(future):
        try:
            return future.result()
        except EngineDeadError as e:
            raise unavailable(str(e)) from None
        except ImageFailedError as e:
            raise ApiError(500, str(e), None, "image_failed", "server_error") from None
        except RequestFailedError as e:  # what the model wrote cannot be drawn: the request's, not a bug
            raise ApiError(422, str(e), "prompt", "text_pass_failed") from None
        except (CancelledError, RequestAbandonedError):
            raise unavailable("the request was given up before it finished") from None

    async def wait_for(future, request: Request):
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        until = deadline()

        def wake(_):
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(finished.set)

        future.add_done_callback(wake)
        while not future.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished.wait(), WAIT_POLL_S)
            if future.done():
                break
            if await request.is_disconnected():
                service.abandon(future)
                raise client_gone()
            error = given_up(future, until)
            if error is not None:
                raise error
        return result_of(future)

    async def start_stream(request: Request, parsed: GenerationRequest, headers: dict, edit: bool,
                           start: float) -> EventStream:
        """Submits a streamed request and answers it with its events: the text written, the previews,
        then one `completed` per image, or an `error` event. A refusal at submission keeps its HTTP
        status (raised here); a client that leaves is seen by the response, which abandons the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item):  # the engine's events and, last, the finished future, in the driver thread's order
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody reads any more
                loop.call_soon_threadsafe(events.put_nowait, item)

        future = await submit(parsed, headers, on_event=put)
        future.add_done_callback(put)
        until = deadline()
        outcome = {"status": 499}  # a stream that ends with no outcome lost its client

        async def body():
            try:
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), WAIT_POLL_S)
                    except asyncio.TimeoutError:  # a quiet while: is anyone still listening?
                        if await request.is_disconnected():
                            return  # the close hook abandons the request
                        event = None
                    if event is future:
                        output = result_of(future)
                        response = await respond(output, parsed)
                        for completed in completed_events(edit, response):
                            yield server_sent_event(completed)
                        outcome["status"] = 200
                        return
                    if isinstance(event, TextDelta):
                        yield server_sent_event(text_delta_event(edit, event.text))
                    elif isinstance(event, PartialImage):
                        height, width = event.pixels.shape[:2]
                        b64 = await asyncio.to_thread(encode_image, event.pixels, parsed.output_format)
                        yield server_sent_event(partial_image_event(edit, b64, height, width, parsed.output_format,
                                                                    event.image_index, event.partial_index))
                    error = given_up(future, until)  # after every event too: events may never pause
                    if error is not None:
                        raise error
            except ApiError as e:
                outcome["status"] = e.status
                yield server_sent_event(error_event(e))
            except Exception as e:  # noqa: BLE001 - a bug still ends the stream in the API's error format
                outcome["status"] = 500
                yield server_sent_event(error_event(internal_error(e)))

        def finish():
            if not future.done():  # its client left mid-stream, or the server is going down
                service.abandon(future)
            count(outcome["status"], start)

        return EventStream(body(), finish, headers)

    return app


async def read_body(request: Request, limit: int, flag: str = "--max-body-bytes", timeout_s: float = 0) -> bytes:
    """The body, or 413 as soon as it passes limit bytes (the declared length is looked at first),
    or 408 when it has not all come within timeout_s (0: no limit): a client that sends a byte now
    and then must not hold a connection for ever."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit, flag)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    deadline = asyncio.get_running_loop().time() + timeout_s if timeout_s else None
    while True:
        left = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            if left is not None and left <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), left)
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not all arrive within {timeout_s:g} s ({size} bytes came; "
                                "--body-timeout)", None, "request_timeout") from None
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit, flag)
        chunks.append(chunk)


def too_large(size: int, limit: int, flag: str = "--max-body-bytes") -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more, over this server's limit of {limit} "
                         f"({flag})", None, "request_too_large")


async def read_form(request: Request, raw: bytes, max_images: int) -> list[tuple[str, object]]:
    """The multipart form of a body already read within its limit: (field, text or file bytes)."""
    async def body():
        yield raw

    try:
        form = await MultiPartParser(request.headers, body(), max_files=max(max_images, 1) + 1, max_fields=64).parse()
    except Exception as e:  # noqa: BLE001 - Starlette raises its own for every malformed form
        raise ApiError(400, f"the request body is not a multipart form this server reads: {e}", None,
                       "invalid_form") from None
    items = []
    for key, value in form.multi_items():
        items.append((key, value if isinstance(value, str) else await value.read()))
    await form.close()
    return items


def parse_request(raw: bytes, engine_config, server: ServerConfig):
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting thousands deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
        raise ApiError(400, f"the request body is not JSON this server reads: {reason}", None, "invalid_json") from None
    return parse_generation(body, engine_config, server)


class EventStream(StreamingResponse):
    """Server-sent events whose `on_close` runs however the stream ends: finished, failed, or its
    client gone (Starlette then cancels the iteration and leaves the body's generator suspended)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close: Callable[[], None], headers: dict):
        # no-cache and no proxy buffering: each event is meant to arrive when it is sent
        super().__init__(content, headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.on_close()


def client_gone() -> ApiError:
    return ApiError(499, "the client disconnected", None, "client_closed_request")


def internal_error(error: Exception) -> ApiError:
    log.exception("epdiff serve: request failed")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", None, "internal_error", "server_error")


def server_timing(**seconds: float) -> str:
    """The W3C Server-Timing header of an answer: where its time went on the server, in
    milliseconds (read: the body read and checked; submit: the engine's own check; queue and
    inference: the engine's, and the denoising steps within inference; engine: its hand-offs
    between them; encode: the images' files; render: the answer's JSON; total: all of it)."""
    return ", ".join(f"{name};dur={max(0.0, s) * 1e3:.1f}" for name, s in seconds.items())


def error_response(error: ApiError, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if error.status in (429, 503):
        headers["Retry-After"] = "1"
    if error.status in (408, 413):  # its body was not read to the end: the connection cannot serve another
        headers["Connection"] = "close"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, None, "service_unavailable", "server_error")
