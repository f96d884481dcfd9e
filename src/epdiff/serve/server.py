"""Running the app under uvicorn: the port first, then the model; signals; the exit code.

The port is bound before any worker starts, so that a port in use is one error line and no
worker is spawned for nothing. SIGTERM or Ctrl-C: the server stops taking requests (503), the
engine finishes the batch in flight within the grace period and fails what has not started,
then the server exits 0; a second signal exits at once. A worker that dies: /health and every
waiting request answer 503 naming the rank, and after a short linger (so that a client polling
/health sees it) the server exits 1. No worker outlives the server.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

import uvicorn

from ..config import ConfigError
from ..engine import EngineConfig
from .app import create_app
from .config import ServerConfig
from .service import EngineService, stop_children

log = logging.getLogger("epdiff.serve")
# After a worker died the server keeps answering 503 this long before it exits.
DEAD_LINGER_S = 2.0
EXIT_OK, EXIT_ENGINE_DEAD = 0, 1


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or ConfigError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: EngineService, grace_s: float):
        super().__init__(config)
        self.service, self.grace_s = service, grace_s
        self.exit_code = EXIT_OK
        self._stopping = False

    def handle_exit(self, sig: int, frame) -> None:
        # Runs as the signal handler: the draining happens on a thread, uvicorn's loop keeps
        # answering (503 for new requests) meanwhile.
        if self._stopping:
            log.warning("epdiff serve: second signal; exiting now")
            self.force_exit = self.should_exit = True
            return
        self._stopping = True
        log.info("epdiff serve: %s: taking no new requests, finishing those in flight (up to %.0f s)",
                 signal.Signals(sig).name, self.grace_s)
        threading.Thread(target=self._drain_then_exit, daemon=True, name="epdiff-serve-drain").start()

    def _drain_then_exit(self) -> None:
        self.service.close(self.grace_s)
        self.should_exit = True

    def engine_died(self) -> None:
        """Called on the event loop once the engine is dead (a worker died, or it never loaded)."""
        self.exit_code = EXIT_ENGINE_DEAD
        self.service.drain()
        timer = threading.Timer(DEAD_LINGER_S, lambda: setattr(self, "should_exit", True))
        timer.daemon = True
        timer.start()


def run_server(config: EngineConfig, server: ServerConfig, log_level: str = "info") -> int:
    """Serves until a signal or a dead worker; returns the exit code."""
    server = server.resolve()
    config = config.resolve()
    sock = bind(server.host, server.port)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    service = EngineService(config, server.max_queue)
    uvicorn_server = None

    def engine_died():
        uvicorn_server.engine_died()

    app = create_app(service, server, on_engine_dead=engine_died)
    uvicorn_server = _Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on",
                                            limit_concurrency=server.max_connections),
                             service, server.shutdown_timeout)
    log.info("epdiff serve: http://%s:%d, loading the model (%s)%s", server.host, server.port,
             config.parallel.describe(), "; API key required" if server.api_key else "")
    try:
        uvicorn_server.run(sockets=[sock])
    finally:
        service.close(server.shutdown_timeout)  # already done unless uvicorn left early
        stop_children()
    if uvicorn_server.exit_code != EXIT_OK:
        log.error("epdiff serve: exiting: %s", service.error)
    return uvicorn_server.exit_code
