"""A pool of gloo worker processes kept alive for a whole test session (docs/architecture.md, "Testing").

Spawning 8 ranks costs ~11 s on a 2-core machine, so tests don't spawn per case: they send a
module-level function to every worker of one long-lived world, and each case builds the
layout it needs inside it (sub-meshes over the first N ranks).
"""

from __future__ import annotations

import datetime
import os
import queue
import traceback

import torch.multiprocessing as mp

from epdiff.distributed.launch import free_port


class WorkerFailed(AssertionError):
    pass


def _regroup(rank: int, size: int, port: int):
    """Leaves the current default group; the first `size` workers form a new one."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if rank < size and size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=120))


def _serve(rank: int, inbox, outbox):
    import torch

    torch.set_num_threads(1)
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, size, port, args = job
        try:
            _regroup(rank, size, port)
            with torch.inference_mode():
                outbox.put((rank, True, fn(rank, *args) if rank < size else None))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))


class World:
    def __init__(self, size: int):
        self.size = size
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(size)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_serve, args=(r, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(size)]
        for p in self.procs:
            p.start()

    def run(self, size: int, fn, *args, timeout: float = 600):
        """fn(rank, *args) on the first `size` workers, in a default process group of exactly
        those ranks; returns their results by rank."""
        if not 1 <= size <= self.size:
            raise ValueError(f"world of {size} asked from a pool of {self.size}")
        port = free_port()
        for box in self.inboxes:
            box.put((fn, size, port, args))
        results, errors = [None] * self.size, []
        for _ in range(self.size):
            try:
                rank, ok, value = self.outbox.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise WorkerFailed(f"workers did not answer within {timeout} s") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                if len(errors) == 1:
                    # Peers may now wait forever in a collective: stop the world.
                    self.close()
                    raise WorkerFailed("\n".join(errors))
        return results[:size]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
