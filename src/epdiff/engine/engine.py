"""The persistent engine: workers start once, load once, then run request after request.

    engine = Engine(EngineConfig(parallel=ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)))
    output = engine.submit(SamplingParams("a small red circle on the left", seed=3)).result()
    engine.close()

Started as one process it spawns one worker per rank (one rank: a thread in this process).
Under torchrun every rank constructs the same Engine: rank 0 drives (a worker thread computes
beside it), the other ranks serve rank 0 inside the constructor until rank 0 closes.

A driver thread feeds the workers one batch at a time from the `BatchPlanner` and hands results
back through futures. A request of a model that writes before it draws runs a writing batch first
(engine/write.py), then its images; while it runs, its `on_event` sees the text as it is written
(`TextDelta`) and the previews it asked for (`PartialImage`). A worker that dies fails every waiting request with an error naming its
rank, and the engine stays dead (`alive` is False).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..distributed.launch import (Channel, WorkerError, WorkerFailed, WorkerGroup, _run_rank, pick_device,
                                  torchrun_ranks, under_torchrun)
from .files import image_metadata, pil_image
from .params import EngineConfig, SamplingParams
from .planner import Batch, BatchPlanner, WritingRows
from .write import NONFINITE
from .worker import (BatchResult, CancelBatch, CollectRoutingStats, Command, Done, JoinText, PartialImages, Progress,
                     Ready, RunBatch, RunText, Stop, Stopped, TextResult, TextTokens, engine_worker)


# How long the first waiting request may wait for others to fill the idle DP groups.
BATCH_WINDOW_S = 0.01
# Each rank's most recent step times kept in rank_metrics (steps_total counts them all).
STEPS_KEPT = 100_000
log = logging.getLogger("epdiff.engine")


class EngineDeadError(RuntimeError):
    """The engine can take no more requests: a worker died, or it was closed."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the engine was told to hold."""


class ImageFailedError(RuntimeError):
    """An image came out wrong (non-finite latents); the message names the rank and the step."""


class RequestAbandonedError(RuntimeError):
    """The caller gave the request up (Engine.abandon) before it finished."""


@dataclass(frozen=True)
class TextDelta:
    """More of the text the model writes before it draws (the deltas add up to what it wrote; the
    text it draws from, RequestOutput.cot_text, ends at its pass's end)."""
    text: str


@dataclass(frozen=True)
class PartialImage:
    """A preview of image `image_index` while it is denoised (SamplingParams.partial_images)."""
    image_index: int
    partial_index: int
    pixels: np.ndarray  # uint8 [H, W, 3]


class RequestFailedError(RuntimeError):
    """The request could not go on after its text pass (what it wrote does not fit)."""


@dataclass
class GeneratedImage:
    prompt: str
    index: int  # within its request
    seed: int  # regenerates exactly this image as a single image
    latents: torch.Tensor  # [C, h, w] fp32
    pixels: np.ndarray | None  # uint8 [H, W, 3]; None when the engine does not decode
    full_steps: int = 0  # the denoising steps that ran the whole model (step caching skips some)
    metadata: dict = field(default_factory=dict)  # what regenerates it (files.image_metadata)

    def to_pil(self):
        """A PIL image whose `save` writes the metadata too (PNG text, JPEG comment)."""
        if self.pixels is None:
            raise ValueError("this engine does not decode (decode=False): the image has latents only")
        return pil_image(self.pixels, self.metadata)


@dataclass
class RequestOutput:
    request_id: int
    params: SamplingParams  # resolved: the size, steps and guidance actually used
    images: list[GeneratedImage]
    queue_seconds: float  # submitted -> its first batch started
    inference_seconds: float  # wall time of the batches that made its images, decode included
    step_seconds: list[float]  # rank 0's steps in those batches
    peak_memory_bytes: int | None  # highest over the ranks (GPU), since the engine started
    text_seconds: float = 0.0  # its text pass's batch (a model that writes before it draws)
    prompt_tokens: int = 0  # the prompt, in the model's tokens
    input_image_tokens: int = 0  # an edit's input images' sections, in the model's tokens
    written_tokens: int = 0  # what its text pass wrote

    @property
    def cot_text(self) -> str | None:
        """What the model wrote before it drew (None: it wrote nothing)."""
        return self.params.cot_text


@dataclass
class _Request:
    request_id: int
    params: SamplingParams
    future: Future
    on_progress: Callable[[int, int], None] | None
    submitted: float
    on_event: Callable[[object], None] | None = None
    written: list = field(default_factory=list)  # its text pass's tokens so far
    sent: str = ""  # the text streamed so far
    text_seconds: float = 0.0
    started: float | None = None
    images: dict = field(default_factory=dict)
    inference_seconds: float = 0.0
    step_seconds: list = field(default_factory=list)
    peak_memory_bytes: int | None = None


class _InProcessWorker:
    """Rank 0's worker as a thread of this process (one rank, or rank 0 under torchrun)."""

    def __init__(self, target):
        self.channel = Channel(queue.Queue(), queue.Queue())
        self.error: str | None = None

        def run():
            try:
                target(self.channel)
            except BaseException as e:  # noqa: BLE001 - reported to the driver, which fails loudly
                self.error = f"worker rank 0 failed: {type(e).__name__}: {e}"
                self.channel.send(WorkerFailed(0, self.error))

        self.thread = threading.Thread(target=run, daemon=True, name="epdiff-rank0")
        self.thread.start()

    def next_event(self, timeout: float):
        return self.channel.next_event(timeout)

    def failure(self) -> str | None:
        return self.error

    def join(self, timeout_s: float):
        self.thread.join(timeout_s)

    def stop(self, grace_s: float = 5.0):
        """A thread cannot be killed: it leaves at its next step (its channel is abandoned)."""
        self.channel.abandoned = True
        self.thread.join(grace_s)


class Engine:
    def __init__(self, config: EngineConfig, *, decode: bool = True, show_progress: bool = False,
                 max_waiting: int | None = None):
        """decode=False: latents only (no VAE). max_waiting: submit raises QueueFullError beyond it."""
        self.config = config.resolve()
        self.max_waiting = max_waiting
        world = self.config.parallel.world_size
        args = (self.config, decode, show_progress)
        self.is_driver = True
        if under_torchrun():
            rank, local_rank, local_world = torchrun_ranks(world)

            def run(channel):
                _run_rank(rank, world, local_rank, local_world, engine_worker, (channel, *args),
                          device_kind=self.config.device)

            if rank != 0:  # serve rank 0 until it closes the engine
                self.is_driver, self.alive = False, False
                run(None)
                return
            self._workers = _InProcessWorker(run)
        elif world == 1:
            device = pick_device(0, 1, self.config.device)
            self._workers = _InProcessWorker(lambda channel: engine_worker(device, channel, *args))
        else:
            self._workers = WorkerGroup(world, engine_worker, args, self.config.device)
        layout = self.config.parallel
        self._planner = BatchPlanner(layout.data_parallel_size, self.config.max_batch_size,
                                     layout.sequence_parallel_size)
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._in_flight = None
        self._joined: list[list] = []  # per DP group, the text passes that joined the writing batch in flight
        self._writing_rows: WritingRows | None = None  # the writing batch in flight's rows
        self._batch_started: float | None = None  # when the batch in flight was sent
        self._last_step: float | None = None  # when it last reported a finished step
        self._commands: deque[tuple[Command, Future]] = deque()  # commands other than batches, with their answers
        self._closing = False
        self.error: str | None = None
        self.alive = False
        try:
            self.rank_metrics = [vars(m) | {"step_seconds": [], "steps_total": 0, "peak_memory_bytes": None}
                                 for m in self._wait_ready()]
        except BaseException:
            self._workers.stop()
            raise
        self.alive = True
        self._driver = threading.Thread(target=self._drive, daemon=True, name="epdiff-driver")
        self._driver.start()

    def _wait_ready(self):
        while True:
            event = self._workers.next_event(0.2)
            if isinstance(event, Ready):
                return event.metrics
            failure = self._workers.failure()
            if failure is not None:
                raise WorkerError(failure)

    # -- requests ----------------------------------------------------------------------------------

    def submit(self, params: SamplingParams, on_progress: Callable[[int, int], None] | None = None,
               on_event: Callable[[object], None] | None = None) -> Future:
        """Queues one request; the future gives its RequestOutput. params are resolved here
        (RequestError names the field). on_progress(step, steps) and on_event(TextDelta or
        PartialImage) run on the driver thread."""
        return self.submit_all([params], on_progress, on_event)[0]

    def submit_all(self, requests: list[SamplingParams],
                   on_progress: Callable[[int, int], None] | None = None,
                   on_event: Callable[[object], None] | None = None) -> list[Future]:
        """Queues requests together, so that the next batch can hold all of them."""
        if not self.is_driver:
            raise EngineDeadError("under torchrun only rank 0 submits requests")
        requests = [params.resolve(self.config) for params in requests]
        futures = []
        with self._lock:
            if not self.alive:
                raise EngineDeadError(self.error or "the engine is closed")
            if self.max_waiting is not None and len(self._planner) + len(requests) > self.max_waiting:
                raise QueueFullError(f"{len(self._planner)} requests are waiting, the limit is {self.max_waiting}")
            for params in requests:
                request_id = next(self._ids)
                future = Future()
                self._requests[request_id] = _Request(request_id, params, future, on_progress, time.perf_counter(),
                                                      on_event)
                self._planner.add(request_id, params)
                future.add_done_callback(lambda f, rid=request_id: f.cancelled() and self._cancel(rid))
                futures.append(future)
        self._dispatch()
        return futures

    def generate(self, params: SamplingParams) -> RequestOutput:
        return self.submit(params).result()

    def _cancel(self, request_id: int):
        with self._lock:
            self._planner.cancel(request_id)
            self._requests.pop(request_id, None)

    def abandon(self, future: Future) -> None:
        """The caller no longer wants this request (its client left, or its time ran out). Not
        started: dropped. Started: its images not yet run are dropped, its future fails with
        RequestAbandonedError, and once every request of the batch in flight is abandoned, every
        rank stops that batch at its next step and the engine goes on with the next."""
        if future.cancel():  # not started: the done callback drops it
            return
        cancel = None
        with self._lock:
            request_id = next((r.request_id for r in self._requests.values() if r.future is future), None)
            if request_id is None:  # finished, failed or abandoned already
                return
            self._planner.cancel(request_id)
            del self._requests[request_id]
            in_flight = self._in_flight[0] if self._in_flight is not None else None
            if isinstance(in_flight, (RunBatch, RunText)) and not any(
                    item.request_id in self._requests for item in self._items_in_flight()):
                cancel = CancelBatch(in_flight.batch.batch_id)
                self._workers.channel.command(cancel)
        _fail(future, RequestAbandonedError("the request was abandoned before it finished"))
        if cancel is not None:
            log.info("epdiff: every request of batch %d was abandoned: stopping it", cancel.batch_id)

    @property
    def batch_age(self) -> tuple[float, float] | None:
        """(seconds since the batch in flight started, seconds since its last finished step), or None
        when none runs: a batch whose steps keep coming is busy; one whose last step is old is stuck."""
        with self._lock:
            started, last = self._batch_started, self._last_step
        if started is None:
            return None
        now = time.perf_counter()
        return now - started, now - last

    @property
    def num_waiting(self) -> int:
        """Requests with images not yet started."""
        with self._lock:
            return len(self._planner)

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._requests)

    def routing_stats(self) -> list[dict]:
        """Per pipeline stage: tokens per (layer, expert) since the engine started, and a summary."""
        return self._command(CollectRoutingStats())

    def _command(self, command: Command):
        """Runs a command on every rank between batches; rank 0's answer."""
        future = Future()
        with self._lock:
            if not self.alive or self._closing:
                raise EngineDeadError(self.error or "the engine is closing")
            self._commands.append((command, future))
        self._dispatch()
        return future.result()

    # -- the driver thread -------------------------------------------------------------------------

    def _drive(self):
        try:
            while True:
                self._dispatch()
                event = self._workers.next_event(BATCH_WINDOW_S if self._planner.oldest is not None else 0.05)
                if event is not None:
                    self._handle(event)
                failure = None if event is not None else self._workers.failure()
                if failure is not None:
                    self._die(failure)
                    return
                if not self.alive or (self._closing and self._in_flight is None and not self._commands):
                    return
        except BaseException as e:  # a bug here must not leave an engine that says it is alive
            self._die(f"the engine's driver failed: {type(e).__name__}: {e}")

    def _dispatch(self):
        with self._lock:
            if self._in_flight is not None:
                self._join_text()
                return
            if self._commands:
                self._in_flight = self._commands[0]
                self._workers.channel.command(self._in_flight[0])
                return
            if self._closing or not self.alive or self._planner.oldest is None:
                return
            now = time.perf_counter()
            # Requests arriving together share a batch: while some DP group would idle, wait a
            # moment for more, but never longer than BATCH_WINDOW_S after the oldest arrived.
            dp = self.config.parallel.data_parallel_size
            oldest = self._requests[self._planner.oldest].submitted
            if self._planner.num_images < dp and now - oldest < BATCH_WINDOW_S:
                return
            batch = self._planner.next_batch()
            command = RunBatch(batch) if isinstance(batch, Batch) else RunText(batch)
            for item in _items(command):
                request = self._requests.get(item.request_id)
                if request is not None and request.started is None:
                    request.started = now
                    request.future.set_running_or_notify_cancel()
            self._in_flight = (command, None)
            self._joined = [[] for _ in batch.groups] if isinstance(command, RunText) else []
            self._writing_rows = WritingRows(batch.groups) if isinstance(command, RunText) else None
            self._batch_started = self._last_step = now
            self._workers.channel.command(command)

    def _join_text(self):
        """Text passes that arrived while a writing batch runs join it (the planner's join_writing),
        where the family lets them (under the lock)."""
        command = self._in_flight[0]
        if not isinstance(command, RunText) or self._closing or not self.config.model_info.text_joins:
            return
        joining = self._planner.join_writing(self._writing_rows)
        if joining is None:
            return
        now = time.perf_counter()
        self._writing_rows.join_sent(joining)
        for joined, more in zip(self._joined, joining):
            joined += more
            for item in more:
                request = self._requests[item.request_id]
                if request.started is None:  # (one queued again after a join came too late has started)
                    request.started = now
                    request.future.set_running_or_notify_cancel()
        self._workers.channel.command(JoinText(command.batch.batch_id, joining))

    def _handle(self, event):
        # WorkerFailed events are the workers' failure() business; Stopped is close()'s.
        if isinstance(event, Progress):
            self._last_step = time.perf_counter()
            for request in self._requests_in_flight():
                if request.on_progress is not None:
                    try:
                        request.on_progress(event.step, event.total)
                    except Exception as e:  # noqa: BLE001 - a caller's callback must not stop the engine
                        log.warning("epdiff: a progress callback failed: %s: %s", type(e).__name__, e)
        elif isinstance(event, TextTokens):
            self._last_step = time.perf_counter()
            with self._lock:
                if self._writing_rows is not None:
                    self._writing_rows.report(event.writing, event.joins_taken)
            for request_id, token in event.tokens.items():
                self._stream_text(request_id, token)
        elif isinstance(event, PartialImages):
            for request_id, image_index, index, pixels in event.images:
                self._event(self._requests.get(request_id), PartialImage(image_index, index, pixels))
        elif isinstance(event, Done):  # the answer to the command in flight (only this thread clears it)
            if isinstance(self._in_flight[0], RunBatch):
                self._finish_batch(event.reply)
            elif isinstance(self._in_flight[0], RunText):
                self._finish_text(event.reply)
            else:
                with self._lock:
                    (_, future), self._in_flight = self._commands.popleft(), None
                future.set_result(event.reply)

    def _items_in_flight(self) -> list:
        """The real rows of the batch in flight, with the text passes that joined it (under the lock)."""
        if self._in_flight is None or not isinstance(self._in_flight[0], (RunBatch, RunText)):
            return []
        return _items(self._in_flight[0]) + self._joined_items()

    def _joined_items(self) -> list:
        """The text passes that joined the writing batch in flight (under the lock)."""
        return [item for group in self._joined for item in group]

    def _requests_in_flight(self) -> list[_Request]:
        with self._lock:
            if self._in_flight is None or not isinstance(self._in_flight[0], RunBatch):
                return []
            ids = {item.request_id for item in self._in_flight[0].batch.images}
            return [self._requests[i] for i in ids if i in self._requests]

    @staticmethod
    def _event(request: _Request | None, event) -> None:
        if request is None or request.on_event is None:
            return
        try:
            request.on_event(event)
        except Exception as e:  # noqa: BLE001 - a caller's callback must not stop the engine
            log.warning("epdiff: an event callback failed: %s: %s", type(e).__name__, e)

    def _stream_text(self, request_id: int, token: int) -> None:
        """The request's written text so far, as a delta (held back while it ends inside a
        character: a byte-level tokenizer's partial UTF-8 decodes to U+FFFD)."""
        with self._lock:
            request = self._requests.get(request_id)
        if request is None:
            return
        request.written.append(token)
        if request.on_event is None or token < 0:
            return
        info = self.config.model_info
        text = info.detokenize(request.params.text_task(), request.written)
        if text.endswith("\ufffd") or not text.startswith(request.sent):
            return
        delta, request.sent = text[len(request.sent):], text
        if delta:
            self._event(request, TextDelta(delta))

    def _finish_text(self, result: TextResult):
        """A writing batch's requests go on to their images, drawn from what they wrote."""
        info, failed = self.config.model_info, []
        with self._lock:
            items = self._in_flight[0].batch.items
            joined = self._joined_items()
            self._in_flight = self._batch_started = self._last_step = self._writing_rows = None
            self._joined = []
            for item in items + joined:
                request = self._requests.get(item.request_id)
                if request is None:  # abandoned meanwhile
                    continue
                params = request.params
                # A pass that joined wrote from its join on (request.started: when it was sent).
                request.text_seconds = result.seconds if item not in joined else min(
                    result.seconds, time.perf_counter() - request.started)
                tokens = result.tokens.get(item.request_id)
                if tokens is None and item in joined:  # it came after the batch's last check: again
                    self._planner.add(item.request_id, params)
                    continue
                try:
                    if tokens is None:
                        raise ValueError("its batch ended without its tokens")
                    if tokens and tokens[-1] == NONFINITE:
                        raise ValueError(f"the logits of token {len(tokens)} were not finite (NaN or inf): the "
                                         f"numbers overflowed in {self.config.dtype}, or the weights are corrupt")
                    cot_text, size, system_prompt = info.finish_text(params.text_task(), tokens)
                    height, width = size if size is not None else (params.height, params.width)
                    info.check_prompt(params.prompt, height, width, system_prompt, params.images, cot_text)
                except ValueError as e:
                    del self._requests[item.request_id]
                    failed.append((request, RequestFailedError(f"after its text pass: {e}")))
                    continue
                request.params = dataclasses.replace(params, cot_text=cot_text, height=height, width=width,
                                                     system_prompt=system_prompt)
                self._planner.add(item.request_id, request.params)
        for request, error in failed:
            _fail(request.future, error)

    def _finish_batch(self, result: BatchResult):
        done = []
        with self._lock:
            self._in_flight = self._batch_started = self._last_step = None
            for rank, (steps, peak) in enumerate(zip(result.step_seconds, result.peak_memory_bytes)):
                metrics = self.rank_metrics[rank]
                metrics["step_seconds"] += steps
                del metrics["step_seconds"][:-STEPS_KEPT]  # a server runs for months
                metrics["steps_total"] += len(steps)
                metrics["peak_memory_bytes"] = peak
            peak = max((p for p in result.peak_memory_bytes if p is not None), default=None)
            touched = set()
            for image in result.images:
                request = self._requests.get(image.request_id)
                if request is None:  # cancelled meanwhile
                    continue
                touched.add(image.request_id)
                request.images[image.image_index] = image
            for request_id in touched:
                request = self._requests[request_id]
                request.inference_seconds += result.seconds
                request.step_seconds += result.step_seconds[0]
                request.peak_memory_bytes = peak
                if len(request.images) == request.params.n:
                    done.append(self._requests.pop(request_id))
        for request in done:
            self._complete(request)

    def _complete(self, request: _Request):
        params = request.params
        bad = [img for img in request.images.values() if img.nonfinite_step is not None]
        if bad:
            img = bad[0]
            request.future.set_exception(ImageFailedError(
                f"non-finite values (NaN or inf) in the latents of image {img.image_index} (seed {img.seed}) on "
                f"rank {img.rank} at step {img.nonfinite_step + 1} of {params.num_inference_steps}: the numbers "
                f"overflowed in {self.config.dtype} with guidance scale {params.guidance_scale:g}, or the model's "
                f"weights are corrupt; no image was made"))
            return
        text_tokens, image_tokens = self.config.model_info.input_tokens(params.prompt, params.system_prompt,
                                                                        params.images)
        images = []
        for k, img in sorted(request.images.items()):
            image = GeneratedImage(params.prompt, k, img.seed, img.latents, img.pixels, img.full_steps)
            image.metadata = image_metadata(image, params, self.config)
            images.append(image)
        request.future.set_result(RequestOutput(
            request_id=request.request_id, params=params, images=images,
            queue_seconds=(request.started or request.submitted) - request.submitted,
            inference_seconds=request.inference_seconds, step_seconds=request.step_seconds,
            peak_memory_bytes=request.peak_memory_bytes, text_seconds=request.text_seconds,
            prompt_tokens=text_tokens, input_image_tokens=image_tokens, written_tokens=len(request.written)))

    def _die(self, failure: str):
        with self._lock:
            if self.alive:  # the first cause stays the engine's error
                self.alive, self.error = False, failure
            failure = self.error
            waiting = list(self._requests.values())
            self._requests.clear()
            commands = list(self._commands)
            self._commands.clear()
        for request in waiting:
            _fail(request.future, EngineDeadError(failure))
        for _, future in commands:
            _fail(future, EngineDeadError(failure))
        self._workers.stop()

    # -- shutting down -----------------------------------------------------------------------------

    def close(self, timeout_s: float = 30.0) -> None:
        """Finishes the batch in flight, fails requests not yet started, stops every worker."""
        if not self.is_driver or not hasattr(self, "_driver"):
            return
        with self._lock:
            if self._closing:
                return
            self._closing = True
            waiting = [(i, r) for i, r in self._requests.items() if r.started is None]
            for request_id, request in waiting:
                self._planner.cancel(request_id)
                del self._requests[request_id]
        for _, request in waiting:
            _fail(request.future, EngineDeadError("the engine was closed before this request started"))
        self._driver.join(timeout_s)
        if self._driver.is_alive():  # the batch in flight outlasted the timeout: give up on it
            self._die(f"the engine was closed while a batch ran longer than {timeout_s:g} s")
            self._driver.join(5.0)
            return
        if self.alive:  # the driver has left: this thread is the only reader of the events
            self._workers.channel.command(Stop())
            deadline = time.time() + timeout_s
            while time.time() < deadline:
                event = self._workers.next_event(0.1)
                if isinstance(event, Stopped):
                    break
                if self._workers.failure() is not None:
                    break
        with self._lock:
            self.alive = False
            self.error = self.error or "the engine is closed"
            left, self._requests = list(self._requests.values()), {}  # started, with images not run
        for request in left:
            _fail(request.future, EngineDeadError("the engine was closed before every image of this request ran"))
        self._workers.join(10.0)  # they leave by themselves after "stop"
        self._workers.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        # Ctrl-C: stop now rather than finish the batch in flight.
        self.close(timeout_s=0.0 if exc_type is KeyboardInterrupt else 30.0)


def _items(command: RunBatch | RunText) -> list:
    """The real rows of a batch as it was sent (images, or text passes)."""
    return command.batch.images if isinstance(command, RunBatch) else command.batch.items


def _fail(future: Future, error: Exception) -> None:
    """Sets error on future unless it is already done (or was just cancelled by its caller)."""
    try:
        future.set_exception(error)
    except InvalidStateError:
        pass
