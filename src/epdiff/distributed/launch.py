"""Starting workers: under torchrun (any number of nodes) or as local processes spawned here.

`launch(world_size, fn, *args)` runs fn(*args) on every rank with the default process group up
(NCCL with one GPU per rank where there are enough GPUs, gloo on CPU otherwise) and returns
rank 0's result. Failure policy: a worker that raises brings the whole run down with a message
naming its rank and error; Ctrl-C stops every worker; a worker whose parent dies exits.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A collective that waits longer than this is a hang (a peer died mid-collective): fail, don't wait.
DEFAULT_TIMEOUT_S = float(os.environ.get("EPDIFF_COLLECTIVE_TIMEOUT_S", "300"))


class WorkerError(RuntimeError):
    """A worker failed; the message names its rank and its error."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def pick_device(local_rank: int, local_world: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(rank: int, world_size: int, local_rank: int, local_world: int,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    device = pick_device(local_rank, local_world)
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


def _run_rank(rank: int, world_size: int, local_rank: int, local_world: int, fn, args, report=None):
    device = init_distributed(rank, world_size, local_rank, local_world)
    try:
        result = fn(device, *args)
    except BaseException as e:
        message = f"{type(e).__name__}: {e}"
        if not isinstance(e, KeyboardInterrupt):
            print(f"[epdiff rank {rank}] {message}", file=sys.stderr, flush=True)
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


def _spawned(local_rank: int, world_size: int, port: int, parent_pid: int, result_queue, fn, args):
    _exit_with_parent(parent_pid)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))

    def report(message: str):
        result_queue.put(pickle.dumps(("error", local_rank, message)))

    result = _run_rank(local_rank, world_size, local_rank, world_size, fn, args, report)
    if local_rank == 0:
        # Plain pickle: torch's queue pickler would pass tensors as shared memory that vanishes
        # with this process.
        result_queue.put(pickle.dumps(("result", 0, result)))
    # The work is handed over: skip interpreter finalization, where gloo's worker threads
    # occasionally abort the process ("terminate called without an active exception", seen
    # once in 21 runs of the README command).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop(processes, grace_s: float = 5.0):
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.time() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def launch(world_size: int, fn, *args):
    """Runs fn(device, *args) on every rank; returns rank 0's return value (None elsewhere)."""
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world_size:
            raise WorkerError(f"torchrun started {os.environ['WORLD_SIZE']} workers but the layout "
                              f"needs world size {world_size}")
        return _run_rank(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", 0)),
                         int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), fn, args)
    if world_size == 1:
        return fn(pick_device(0, 1), *args)
    ctx = mp.get_context("spawn")
    result_queue = ctx.SimpleQueue()
    context = mp.start_processes(_spawned, args=(world_size, free_port(), os.getpid(), result_queue, fn, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    result, errors = None, {}

    def drain():
        nonlocal result
        while not result_queue.empty():
            kind, rank, payload = pickle.loads(result_queue.get())
            if kind == "result":
                result = payload
            else:
                errors.setdefault(rank, payload)

    try:
        while True:
            done = context.join(timeout=0.2)
            drain()  # while rank 0 may still be writing
            if done:
                break
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        _stop(context.processes)
        drain()
        rank = e.error_index if e.error_index in errors else min(errors, default=e.error_index)
        if rank in errors:
            raise WorkerError(f"worker rank {rank} failed:\n{errors[rank]}") from None
        if isinstance(e, mp.ProcessRaisedException):
            raise WorkerError(f"worker rank {rank} failed:\n{_last_error(e.msg)}") from None
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        raise WorkerError(f"worker rank {rank} died ({how})") from None
    except KeyboardInterrupt:
        _stop(context.processes)
        raise
    return result


def _last_error(msg: str) -> str:
    lines = [line for line in msg.strip().splitlines() if line.strip()]
    return "\n".join(lines[-1:]) if lines else msg

