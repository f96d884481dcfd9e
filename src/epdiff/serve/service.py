"""The engine as the server sees it: loaded in the background, watched, drained, closed.

States: loading -> ready -> draining -> stopped, or -> dead (a worker died, or the model could not
be loaded). Only `ready` takes requests. `closed` tells a request still waiting after the engine
was closed that no answer will come (the engine may not finish a batch within the grace period).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from typing import Callable

from ..engine import Engine, EngineConfig, EngineDeadError, SamplingParams

log = logging.getLogger("epdiff.serve")

# Progress of this many recent requests is kept for the page to read after the fact.
PROGRESS_KEPT = 512


class Progress:
    """Step progress per client-chosen request id, fed by the engine's on_progress callback
    (which runs on the engine's driver thread)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, dict] = OrderedDict()

    def update(self, request_id: str, **fields) -> None:
        with self._lock:
            self._set(request_id, fields)

    def claim(self, request_id: str, steps: int | None) -> bool:
        """Starts request_id's entry; False while a request under that id has not finished (one
        look and set under the lock: two requests sent at once under one id cannot both claim it)."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None and entry["status"] in ("queued", "running"):
                return False
            self._set(request_id, dict(status="queued", step=0, steps=steps))
        return True

    def _set(self, request_id: str, fields: dict) -> None:
        entry = self._entries.setdefault(request_id, {"status": "queued", "step": 0, "steps": None})
        entry.update(fields)
        self._entries.move_to_end(request_id)
        while len(self._entries) > PROGRESS_KEPT:
            self._entries.popitem(last=False)

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def get(self, request_id: str) -> dict | None:
        with self._lock:
            entry = self._entries.get(request_id)
            return None if entry is None else dict(entry)


class ProgressIdInUse(ValueError):
    """A request named itself after one still running (X-Request-ID): its progress would be lost."""


class EngineService:
    def __init__(self, config: EngineConfig, max_waiting: int | None, *, decode: bool = True):
        self.config = config
        self.max_waiting = max_waiting
        self.decode = decode
        self.engine: Engine | None = None
        self.state = "loading"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.progress = Progress()
        self._lock = threading.Lock()
        self._stop_requested = threading.Event()
        self._load_finished = threading.Event()
        self.closed = threading.Event()  # set once the engine is closed: no future will complete after it
        self._loader = threading.Thread(target=self._load, daemon=True, name="epdiff-serve-load")

    # -- life ----------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loader.start()

    def _load(self) -> None:
        start = time.perf_counter()
        try:
            engine = Engine(self.config, decode=self.decode, max_waiting=self.max_waiting)
        except BaseException as e:  # noqa: BLE001 - the server reports it and exits non-zero
            with self._lock:
                self.state, self.error = "dead", f"the engine did not start: {e}"
            if not self._stop_requested.is_set():  # else its workers were stopped on purpose
                log.error("epdiff serve: %s", self.error)
            self._load_finished.set()
            return
        with self._lock:
            self.engine = engine
            self.load_seconds = time.perf_counter() - start
            # A shutdown that came while loading is waiting in close(), which closes the engine.
            self.state = "draining" if self._stop_requested.is_set() else "ready"
        self._load_finished.set()
        log.info("epdiff serve: model loaded in %.1f s (%s)", self.load_seconds, self.config.parallel.describe())

    def check(self) -> bool:
        """Notices a dead engine (called periodically); True when it has just died."""
        with self._lock:
            if self.state != "ready" or self.engine is None or self.engine.alive:
                return False
            self.state, self.error = "dead", self.engine.error or "the engine stopped"
        log.error("epdiff serve: %s", self.error)
        return True

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and self.engine is not None and self.engine.alive

    def drain(self) -> None:
        """Takes no new requests from now on."""
        with self._lock:
            self._stop_requested.set()
            if self.state in ("loading", "ready"):
                self.state = "draining"

    def close(self, grace_s: float = 30.0) -> None:
        """Finishes what is in flight within grace_s, fails the rest, stops every worker."""
        self.drain()
        if self._loader.is_alive():
            self._load_finished.wait(grace_s)
        engine = self.engine
        if engine is not None:
            closer = threading.Thread(target=engine.close, args=(grace_s,), daemon=True, name="epdiff-serve-close")
            closer.start()
            closer.join(grace_s + 5.0)
        with self._lock:
            if self.state != "dead":
                self.state = "stopped"
        # Requests the engine could not answer within the grace period see `closed` and get 503.
        # A worker the engine could not stop is ended by the server process (run_server), not
        # here: an app in a process with children of its own (a test's) must leave them alone.
        self.closed.set()

    # -- requests ------------------------------------------------------------------------------------

    def submit(self, params: SamplingParams, progress_id: str | None,
               on_event: Callable[[object], None] | None = None) -> Future:
        """Raises EngineDeadError (not ready), QueueFullError, ProgressIdInUse or RequestError. on_event: the
        engine's TextDelta and PartialImage events, on its driver thread."""
        with self._lock:
            if self.state != "ready":
                raise EngineDeadError(self.unavailable_reason())
            engine = self.engine
        on_progress = None
        if progress_id is not None:
            if not self.progress.claim(progress_id, params.num_inference_steps):
                raise ProgressIdInUse(f"X-Request-ID {progress_id!r} is a request's that has not finished; give "
                                      "each request its own")

            def on_progress(step: int, steps: int):
                self.progress.update(progress_id, status="running", step=step, steps=steps)

        try:
            future = engine.submit(params, on_progress=on_progress, on_event=on_event)
        except BaseException:
            if progress_id is not None:  # a refused request leaves no entry
                self.progress.discard(progress_id)
            raise
        if progress_id is not None:
            future.add_done_callback(lambda f: self.progress.update(
                progress_id, status="failed" if f.cancelled() or f.exception() is not None else "done"))
        return future

    def abandon(self, future: Future) -> None:
        """A request nobody waits for any more (the engine drops it or stops its batch)."""
        engine = self.engine
        if engine is not None:
            engine.abandon(future)
        else:
            future.cancel()

    def not_ready_reason(self) -> str | None:
        """Why a request sent now would not be taken, or None."""
        if not self.healthy or self.state != "ready":
            return self.unavailable_reason() if self.state != "ready" else (self.error or "the engine stopped")
        if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
            return f"the queue is full ({self.engine.num_waiting} requests waiting)"
        return None

    def unavailable_reason(self) -> str:
        if self.state == "loading":
            return "the model is still loading"
        if self.state == "dead":
            return self.error or "the engine stopped"
        if self.state == "ready" and self.engine is not None and not self.engine.alive:  # not yet seen by check()
            return self.engine.error or "the engine stopped"
        return "the server is shutting down"


def stop_children(grace_s: float = 5.0) -> None:
    """Whatever child process is still running (a worker the engine could not stop) is ended."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.time() + grace_s
    for child in children:
        child.join(max(0.0, deadline - time.time()))
        if child.is_alive():
            log.warning("epdiff serve: worker process %d did not stop; killing it", child.pid)
            child.kill()
            child.join(1.0)
