"""The loop every rank runs for the engine's life: load once, then batch after batch in lockstep.

Rank 0 takes each command from the driver (its `Channel`) and broadcasts it to every rank over a
gloo control group, so idle waits and decode waits happen on the CPU side with no collective
timeout to hit; NCCL collectives then only ever wait for peers that are computing the same batch.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed.parallel_state import ParallelState
from ..moe.stats import collect_routing_stats

# Rank 0 broadcasts a no-op this often while idle, so that a rank waiting for the next command
# never waits longer than the control group allows.
HEARTBEAT_S = 60.0
CONTROL_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class ImageResult:
    """One denoised image as it travels back to the driver."""
    request_id: int
    image_index: int
    seed: int
    rank: int
    latents: torch.Tensor  # [C, h, w] fp32
    pixels: object  # numpy uint8 [H, W, 3], or None (latents only, or not finite)
    nonfinite_step: int | None


@dataclass
class BatchResult:
    batch_id: int
    images: list[ImageResult]
    seconds: float  # rank 0's wall time for the batch, decode included
    step_seconds: list[list[float]]  # per rank
    peak_memory_bytes: list[int | None]  # per rank


class ControlPlane:
    """Small Python objects between rank 0 and every rank (gloo, CPU)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if dist.is_initialized() else None
        self.rank = dist.get_rank() if self.group is not None else 0

    def broadcast(self, obj):
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's object on rank 0 (by rank), None elsewhere."""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


def engine_worker(device: torch.device, channel, config, decode: bool, show_progress: bool):
    """Runs on every rank; channel is rank 0's line to the driver (None elsewhere)."""
    from ..models.hunyuan_image3.pipeline import HunyuanImage3Pipeline

    # tqdm's default lock is a multiprocessing semaphore; a worker leaves with os._exit, so the
    # resource tracker would report it as leaked. One rank draws the bar: a thread lock will do.
    tqdm.set_lock(threading.RLock())
    parallel = ParallelState.build(config.parallel, device)
    control = ControlPlane()
    pipe = HunyuanImage3Pipeline(config, parallel, decode=decode)
    loaded = control.gather(pipe.metrics)
    if channel is not None:
        channel.send("ready", loaded)
    while True:
        command = control.broadcast(channel.receive(HEARTBEAT_S) if channel is not None else None)
        if command is None:
            continue
        kind = command[0]
        if kind == "stop":
            break
        if kind == "batch":
            result = run_batch(pipe, parallel, control, command[1], channel, show_progress)
            if channel is not None:
                channel.send("batch", result)
        elif kind == "routing":
            reply = routing_summary(pipe, parallel, control)
            if channel is not None:
                channel.send("routing", reply)
        else:
            raise ValueError(f"unknown engine command {kind!r}")
    if channel is not None:
        channel.send("stopped")


def run_batch(pipe, parallel: ParallelState, control: ControlPlane, batch, channel, show_progress: bool) -> BatchResult:
    start = time.perf_counter()
    items = batch.groups[parallel.dp.rank]
    on_step = None
    if channel is not None:
        def on_step(step: int, total: int):
            if channel.abandoned:  # rank 0 is a thread of a driver that has given up on this batch
                raise RuntimeError("the engine was closed during this batch")
            channel.send("progress", (batch.batch_id, step, total))
    denoised = pipe(items, on_step, show_progress)
    mine = []
    if pipe.decodes:  # one rank per DP group reports its group's images
        mine = [ImageResult(d.item.request_id, d.item.image_index, d.item.seed, parallel.global_rank, d.latents,
                            None if d.pixels is None else d.pixels.numpy(), d.nonfinite_step)
                for d in denoised if d.item.request_id is not None]
    parts = control.gather((mine, pipe.metrics.step_seconds, pipe.metrics.peak_memory_bytes))
    if parts is None:
        return None
    return BatchResult(batch.batch_id, [image for part in parts for image in part[0]], time.perf_counter() - start,
                       [part[1] for part in parts], [part[2] for part in parts])


def routing_summary(pipe, parallel: ParallelState, control: ControlPlane):
    """Per pipeline stage: its layers, tokens per (layer, expert) since load, and the summary."""
    stats = None
    if pipe.transformer.moe_layers:
        s = collect_routing_stats(pipe.transformer.moe_layers, parallel)
        stats = dict(stage=parallel.pp.rank, layers=pipe.transformer.layer_ids,
                     tokens_per_expert=s.tokens_per_expert.tolist(), summary=s.summary())
    parts = control.gather(stats if parallel.ep.rank == 0 else None)
    return None if parts is None else [p for p in parts if p]
