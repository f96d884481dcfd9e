"""The HTTP routes: the OpenAI image endpoint, models, health, metrics, progress and the page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
import time
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine import EngineDeadError, ImageFailedError, QueueFullError
from .api import ApiError, encode_images, generation_response, parse_generation
from .service import EngineService

log = logging.getLogger("epdiff.serve")

STATIC = os.path.join(os.path.dirname(__file__), "static")
PROGRESS_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# How often a waiting request looks whether its client is gone or the engine was closed.
WAIT_POLL_S = 0.5
WATCH_S = 0.2  # how often the engine's health is looked at
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
STATUSES = ("200", "400", "429", "500", "503")


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


def create_app(service: EngineService, *, on_engine_dead: Callable[[], None] = lambda: None,
               shutdown_grace_s: float = 30.0) -> FastAPI:
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
        await asyncio.to_thread(service.close, shutdown_grace_s)

    app = FastAPI(title="epdiff", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        if service.healthy:
            return {"status": "ok"}
        body = {"status": service.state, "error": service.unavailable_reason()}
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "epdiff",
            "parallel_layout": layout, **service.config.model_info.describe()}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/images/progress/{progress_id}")
    async def progress(progress_id: str):
        entry = service.progress.get(progress_id)
        if entry is None:
            return JSONResponse(ApiError(404, f"no request with id {progress_id!r}", "progress_id",
                                         "not_found").body(), status_code=404)
        return entry

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        start = time.perf_counter()
        headers = {}
        try:
            body, headers = await generate(request)
            status, response = 200, JSONResponse(body, headers=headers)
        except ApiError as e:
            status = e.status
            if status in (429, 503):
                headers["Retry-After"] = "1"
            response = JSONResponse(e.body(), status_code=status, headers=headers)
        except Exception as e:  # noqa: BLE001 - a bug still answers in the API's error format
            log.exception("epdiff serve: request failed")
            status = 500
            response = JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                                             "server_error").body(), status_code=500)
        metrics.requests.labels(str(status)).inc()
        if status == 200:
            metrics.latency.observe(time.perf_counter() - start)
        return response

    async def generate(request: Request) -> tuple[dict, dict]:
        progress_id = request.headers.get("x-request-id")
        if progress_id is not None and not PROGRESS_ID.fullmatch(progress_id):
            raise ApiError(400, f"X-Request-ID must be 1 to 64 letters, digits, '-' or '_', got {progress_id!r}",
                           None, "invalid_request_id")
        headers = {} if progress_id is None else {"X-Request-ID": progress_id}
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        parsed = parse_generation(body, service.config)
        try:
            future = service.submit(parsed.params, progress_id)
        except QueueFullError as e:
            raise ApiError(429, f"the queue is full: {e}; retry later", None, "queue_full",
                           "rate_limit_exceeded") from None
        except EngineDeadError as e:
            raise unavailable(str(e)) from None
        output = await wait_for(future, request)
        data = await asyncio.to_thread(encode_images, output, parsed.output_format, service.config)
        metrics.images.inc(len(data))
        metrics.inference.observe(output.inference_seconds)
        metrics.queue.observe(output.queue_seconds)
        metrics.observe_steps(service)
        return generation_response(output, data, parsed.output_format), headers

    async def wait_for(future, request: Request):
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()

        def wake(_):
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(finished.set)

        future.add_done_callback(wake)
        while not future.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(finished.wait(), WAIT_POLL_S)
            if future.done():
                break
            if service.closed.is_set():
                raise unavailable("the server shut down before this request finished")
            if await request.is_disconnected():
                # Not started yet: the engine drops it. Started: it finishes and the result is
                # dropped; either way the engine goes on with the next request.
                future.cancel()
                raise ApiError(499, "the client disconnected", None, "client_closed_request")
        try:
            return future.result()
        except EngineDeadError as e:
            raise unavailable(str(e)) from None
        except ImageFailedError as e:
            raise ApiError(500, str(e), None, "image_failed", "server_error") from None

    return app


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, None, "service_unavailable", "server_error")
