"""`epdiff serve` as a subprocess on a free port, for the server and browser tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx

from epdiff.distributed.launch import free_port

STARTUP_TIMEOUT_S = 180


def metric(client, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics, e.g. metric(client, "epdiff_requests_total", '{status="200"}')."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}{labels}")


class ServerProcess:
    def __init__(self, args: list[str], log_path, launcher: list[str] = ()):
        """launcher: what starts `-m epdiff.cli serve ...` (default: this Python; e.g. torchrun)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        launcher = list(launcher) or [sys.executable]
        self.process = subprocess.Popen([*launcher, "-m", "epdiff.cli", "serve", "--port", str(self.port), *args],
                                        stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.process.pid

    def log(self) -> str:
        self._log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become healthy in {timeout_s} s:\n{self.log()}")

    def children(self) -> list[int]:
        return children(self.pid)

    def workers(self) -> list[int]:
        """The spawned worker processes, rank order (they are started in rank order)."""
        return sorted(p for p in self.children() if "spawn_main" in cmdline(p))

    def stop(self) -> None:
        """For fixtures' teardown: SIGTERM, then SIGKILL for the server and whatever it left."""
        left = self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in left:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


@contextmanager
def healthy_server(engine_flags: list[str], log_path):
    """A server started with engine_flags, once /health says 200; stopped on leaving."""
    server = ServerProcess(engine_flags, log_path)
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (a zombie has finished: only its parent's bookkeeping is left)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class InProcessServer:
    """The app under uvicorn on a thread of this process, on a free port: a one-rank engine loads
    in the test process (no interpreter to start), and clients reach it over real HTTP (streams,
    disconnects, OpenAI's client)."""

    def __init__(self, engine_config, **server_options):
        import uvicorn

        from epdiff.serve.app import create_app
        from epdiff.serve.config import ServerConfig
        from epdiff.serve.server import bind
        from epdiff.serve.service import EngineService

        server = ServerConfig(**server_options).resolve()
        self.service = EngineService(engine_config.resolve(), server.max_queue)
        self._socket = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        # Signal handlers are the process's (pytest's): uvicorn installs none on a thread.
        self._server = uvicorn.Server(uvicorn.Config(create_app(self.service, server), log_level="warning",
                                                     lifespan="on", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True,
                                        name="test-uvicorn")

    def __enter__(self):
        self._thread.start()
        deadline = time.time() + STARTUP_TIMEOUT_S
        while time.time() < deadline:
            if self.service.state == "dead" or not self._thread.is_alive():
                raise AssertionError(f"the server did not start: {self.service.error}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the server did not become healthy in {STARTUP_TIMEOUT_S} s")

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(60)
        self._socket.close()
