"""Starting workers: under torchrun (any number of nodes) or as local processes spawned here.

`launch(world_size, fn, *args)` runs fn(device, *args) once on every rank with the default process
group up (NCCL with one GPU per rank where there are enough GPUs, gloo on CPU otherwise) and
returns rank 0's result. `WorkerGroup` keeps spawned workers running fn(device, channel, *args)
for as long as the caller wants (the persistent engine): rank 0 gets a `Channel` to the parent,
commands in and events out. Failure policy: a worker that raises brings the whole run down with a
message naming its rank and error; Ctrl-C stops every worker; a worker whose parent dies exits.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from multiprocessing import connection as mp_connection
from torch.multiprocessing import _prctl_pr_set_pdeathsig

# A collective that waits longer than this is a hang (a peer died mid-collective): fail, don't wait.
DEFAULT_TIMEOUT_S = float(os.environ.get("EPDIFF_COLLECTIVE_TIMEOUT_S", "300"))


class WorkerError(RuntimeError):
    """A worker failed; the message names its rank and its error."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def is_rank_zero() -> bool:
    """True in a process started here, and in torchrun's rank 0."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def local_world_size(world_size: int) -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE under torchrun, else the whole world
    (spawned here)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if under_torchrun() else world_size


def torchrun_ranks(world_size: int) -> tuple[int, int, int]:
    """(rank, local rank, local world size) of this torchrun worker; WorkerError when torchrun
    started a world of another size than the layout's."""
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise WorkerError(f"torchrun started {os.environ['WORLD_SIZE']} workers but the layout "
                          f"needs world size {world_size}")
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), local_world_size(world_size)


def pick_device(local_rank: int, local_world: int, kind: str = "auto") -> torch.device:
    """kind: cuda, cpu, or auto (CUDA when every local rank has a GPU). The engine checks the GPU
    count against the layout before any worker starts (EngineConfig.resolve)."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available() and torch.cuda.device_count() >= local_world):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(rank: int, world_size: int, local_rank: int, local_world: int,
                     timeout_s: float = DEFAULT_TIMEOUT_S, device_kind: str = "auto") -> torch.device:
    device = pick_device(local_rank, local_world, device_kind)
    if device.type == "cpu" and local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Each rank's intra-op threads default to every core: ranks sharing the cores then
        # oversubscribe them, and every small collective waits on descheduled threads (TP2 on 2
        # cores ran 25 times slower). Share the cores out, as torchrun's OMP_NUM_THREADS=1 does.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_with_parent(parent_pid: int):
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(1.0)
    threading.Thread(target=watch, daemon=True, name="epdiff-parent-watch").start()


@dataclass(frozen=True)
class WorkerFailed:
    """The event of a worker whose function raised: its rank and its error."""
    rank: int
    message: str


@dataclass(frozen=True)
class WorkerResult:
    """The event of rank 0 returning from launch()'s function."""
    value: object


class Channel:
    """Rank 0's line to the process driving the workers: commands in, events out (any picklable
    objects: the engine's are typed in engine/worker.py). Everything travels as plain pickle:
    torch's queue pickler would pass tensors as shared memory that vanishes with the sending
    process."""

    def __init__(self, commands, events):
        self._commands, self._events = commands, events
        self.abandoned = False  # set by a driver in this process that gave up on the worker

    def receive(self, timeout: float | None = None):
        """The next command, or None when none came within timeout seconds."""
        try:
            return pickle.loads(self._commands.get(timeout=timeout))
        except queue.Empty:
            return None

    def poll(self):
        """A command that is already waiting, or None (never blocks)."""
        try:
            return pickle.loads(self._commands.get_nowait())
        except queue.Empty:
            return None

    def send(self, event) -> None:
        self._events.put(pickle.dumps(event))

    # The driver's side.
    def command(self, command) -> None:
        self._commands.put(pickle.dumps(command))

    def next_event(self, timeout: float):
        """The next event, or None when nothing came within timeout seconds."""
        try:
            return pickle.loads(self._events.get(timeout=timeout))
        except queue.Empty:
            return None


def _run_rank(rank: int, world_size: int, local_rank: int, local_world: int, fn, args, report=None,
              device_kind: str = "auto"):
    device = init_distributed(rank, world_size, local_rank, local_world, device_kind=device_kind)
    try:
        result = fn(device, *args)
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
        if not isinstance(e, KeyboardInterrupt):
            # One write: a print's text and newline go separately, and ranks' lines would interleave.
            sys.stderr.write(f"[epdiff rank {rank}] {message}\n")
            sys.stderr.flush()
        if report is not None:
            report(message)
        if world_size > 1:
            # No teardown: destroying an NCCL process group flushes its pending collectives, which
            # waits for peers that may never come (so would the interpreter's exit). The launcher
            # or torchrun stops the peers once this process is gone.
            sys.stdout.flush()
            os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _spawned(local_rank: int, world_size: int, port: int, parent_pid: int, commands, events, fn, args,
             device_kind: str, persistent: bool):
    # torch's spawn asks for SIGINT when the parent *thread* that started us ends (prctl
    # PR_SET_PDEATHSIG), which would kill an engine built in a short-lived thread; the watch
    # below ends the worker when the parent *process* is gone instead.
    _prctl_pr_set_pdeathsig(0)
    _exit_with_parent(parent_pid)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))

    def report(message: str):
        events.put(pickle.dumps(WorkerFailed(local_rank, message)))
        events.close()  # the process exits next: let the queue's feeder thread deliver it first
        events.join_thread()

    if persistent:
        # The driver owns shutdown: Ctrl-C reaches the whole terminal group, and a server drains
        # on it (the driver stops these workers when it gives up; the parent watch covers the rest).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        args = (Channel(commands, events) if local_rank == 0 else None, *args)
    result = _run_rank(local_rank, world_size, local_rank, world_size, fn, args, report, device_kind)
    if local_rank == 0 and not persistent:
        events.put(pickle.dumps(WorkerResult(result)))
    # The work is handed over: skip interpreter finalization, where gloo's worker threads
    # occasionally abort the process ("terminate called without an active exception", seen
    # once in 21 runs of the README command). Wait for the queue's feeder thread first.
    events.close()
    events.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _reap(processes, timeout_s: float) -> None:
    """Waits up to timeout_s for the processes to end, joining each the moment it does (none stays
    a zombie while the others finish)."""
    deadline = time.time() + timeout_s
    running = [p for p in processes if p.exitcode is None]
    while running and time.time() < deadline:
        ended = mp_connection.wait([p.sentinel for p in running], max(0.0, deadline - time.time()))
        for p in running:
            if p.sentinel in ended:
                p.join()
        running = [p for p in running if p.exitcode is None]


def _stop(processes, grace_s: float = 5.0):
    for p in processes:
        if p.is_alive():
            p.terminate()
    _reap(processes, grace_s)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


class WorkerGroup:
    """world_size spawned local workers running fn(device, channel, *args); rank 0's channel is
    `self.channel` here. `failure()` names a worker that has died, without blocking."""

    def __init__(self, world_size: int, fn, args=(), device_kind: str = "auto", persistent: bool = True):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.channel = Channel(ctx.Queue(), ctx.Queue())
        self.errors: dict[int, str] = {}
        self.context = mp.start_processes(
            _spawned, args=(world_size, free_port(), os.getpid(), self.channel._commands, self.channel._events, fn,
                            args, device_kind, persistent), nprocs=world_size, join=False, start_method="spawn")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.context.processes]

    def next_event(self, timeout: float):
        """The next event from the workers; failures are also kept in self.errors."""
        event = self.channel.next_event(timeout)
        if isinstance(event, WorkerFailed):
            self.errors.setdefault(event.rank, event.message)
        return event

    def failure(self) -> str | None:
        """'worker rank R failed: ...' (or 'died (signal ...)') once any worker has ended badly."""
        dead = [(rank, p) for rank, p in enumerate(self.context.processes) if p.exitcode not in (None, 0)]
        if not dead and not self.errors:
            return None
        if dead and not self.errors:  # its message may still be on the way
            deadline = time.time() + 1.0
            while time.time() < deadline and not self.errors:
                self.next_event(0.1)
        # A worker killed by a signal (the OOM killer, a user) said nothing: it is the cause, and
        # its peers' errors are only broken connections to it. Otherwise the first error is.
        killed = [(rank, p) for rank, p in dead if p.exitcode < 0 and rank not in self.errors]
        if killed or not self.errors:
            rank, p = (killed or dead)[0]
            how = f"signal {signal_name(-p.exitcode)}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            return f"worker rank {rank} died ({how})"
        rank = next(iter(self.errors))
        return f"worker rank {rank} failed: {self.errors[rank]}"

    def all_exited(self) -> bool:
        return all(p.exitcode is not None for p in self.context.processes)

    def join(self, timeout_s: float) -> None:
        _reap(self.context.processes, timeout_s)

    def stop(self, grace_s: float = 5.0) -> None:
        _stop(self.context.processes, grace_s)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def launch(world_size: int, fn, *args, device_kind: str = "auto"):
    """Runs fn(device, *args) on every rank; returns rank 0's return value (None elsewhere)."""
    if under_torchrun():
        rank, local_rank, local_world = torchrun_ranks(world_size)
        return _run_rank(rank, world_size, local_rank, local_world, fn, args, device_kind=device_kind)
    if world_size == 1:
        return fn(pick_device(0, 1, device_kind), *args)
    group = WorkerGroup(world_size, fn, args, device_kind, persistent=False)
    try:
        while True:
            event = group.next_event(0.2)
            if isinstance(event, WorkerResult):
                result = event.value
                break
            failure = group.failure()
            if failure is not None:
                group.stop()
                raise WorkerError(failure)
        group.join(30)
        group.stop()
    except KeyboardInterrupt:
        group.stop()
        raise
    return result
