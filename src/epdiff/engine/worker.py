"""The loop every rank runs for the engine's life: load once, then command after command in lockstep.

Rank 0 takes each command from the driver (its `Channel`) and broadcasts it to every rank over a
gloo control group, so idle waits and decode waits happen on the CPU side with no collective
timeout to hit; NCCL collectives then only ever wait for peers that are computing the same batch.
Rank 0 answers each command with one `Done` event carrying its result.
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed.parallel_state import ParallelState
from ..moe.layer import moe_layers
from ..moe.stats import collect_routing_stats
from .denoise import BatchCancelled, RankMetrics, denoise, is_decode_rank, preview_steps
from .planner import Batch, TextBatchPlan
from .write import TextCheck, write

# Rank 0 broadcasts a no-op this often while idle, so that a rank waiting for the next command
# never waits longer than the control group allows.
HEARTBEAT_S = 60.0
CONTROL_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class RunBatch:
    """Denoise (and decode) one batch; the answer is a BatchResult."""
    batch: Batch


@dataclass(frozen=True)
class RunText:
    """Write one batch's text passes; the answer is a TextResult."""
    batch: TextBatchPlan


@dataclass(frozen=True)
class CollectRoutingStats:
    """The answer: per pipeline stage, its MoE layers, tokens per (layer, expert) since load, a summary."""


@dataclass(frozen=True)
class Stop:
    """Every rank leaves its loop (the answer is a Stopped event)."""


@dataclass(frozen=True)
class CancelBatch:
    """Sent while batch `batch_id` runs, when every request in it has been abandoned: every rank
    stops it at the next step boundary (its answer is the batch's Done, with `cancelled_at`). Ignored
    when it comes after the batch."""
    batch_id: int


@dataclass(frozen=True)
class JoinText:
    """Sent while writing batch `batch_id` runs: text passes to join it at its next check
    (groups[g]: those for DP group g). Ignored when it comes after the batch (the driver then
    finds them missing from its result and queues them again)."""
    batch_id: int
    groups: tuple


Command = RunBatch | RunText | CollectRoutingStats | Stop | CancelBatch | JoinText


@dataclass(frozen=True)
class Ready:
    """Every rank has loaded: their RankMetrics, by rank."""
    metrics: list


@dataclass(frozen=True)
class Progress:
    batch_id: int
    step: int
    total: int


@dataclass(frozen=True)
class TextTokens:
    """The tokens a writing batch's requests wrote in one step (request id -> token), how many
    real rows wrote in each DP group, and how many JoinText commands the batch has taken."""
    batch_id: int
    tokens: dict
    writing: tuple = ()
    joins_taken: int = 0


@dataclass(frozen=True)
class PartialImages:
    """Previews decoded after a step: (request id, image index, preview index, uint8 pixels)."""
    batch_id: int
    images: list


@dataclass(frozen=True)
class Done:
    """The answer to the command in flight (a BatchResult, or the routing statistics)."""
    reply: object


@dataclass(frozen=True)
class Stopped:
    """Every rank has left its loop."""


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
    full_steps: int  # the steps that ran the whole model


@dataclass
class TextResult:
    batch_id: int
    tokens: dict  # request id -> every token its text pass wrote
    seconds: float
    cancelled_at: int | None = None


@dataclass
class BatchResult:
    batch_id: int
    images: list[ImageResult]
    seconds: float  # rank 0's wall time for the batch, decode included
    step_seconds: list[list[float]]  # per rank
    peak_memory_bytes: list[int | None]  # per rank
    cancelled_at: int | None = None  # the step after which every rank stopped (CancelBatch), or None


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

    def agree(self, flag: bool) -> bool:
        """Rank 0's flag, on every rank (a one-element gloo broadcast: no GPU is waited for)."""
        if self.group is None:
            return flag
        box = torch.tensor([int(flag)])
        dist.broadcast(box, src=0, group=self.group)
        return bool(box.item())

    def gather(self, obj) -> list | None:
        """Every rank's object on rank 0 (by rank), None elsewhere."""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out


def engine_worker(device: torch.device, channel, config, decode: bool, show_progress: bool):
    """Runs on every rank; channel is rank 0's line to the driver (None elsewhere). config: a
    resolved EngineConfig."""
    # tqdm's default lock is a multiprocessing semaphore; a worker leaves with os._exit, so the
    # resource tracker would report it as leaked. One rank draws the bar: a thread lock will do.
    tqdm.set_lock(threading.RLock())
    parallel = ParallelState.build(config.parallel, device)
    control = ControlPlane()
    start = time.perf_counter()
    pipe = config.model_info.load_pipeline(parallel, getattr(torch, config.dtype), config.load_format,
                                           config.quantization, decode=decode and is_decode_rank(parallel))
    pipe.use_cuda_graphs = not config.enforce_eager
    metrics = RankMetrics.of(pipe, parallel, time.perf_counter() - start)
    loaded = control.gather(metrics)
    if channel is not None:
        channel.send(Ready(loaded))
    while True:
        command = control.broadcast(channel.receive(HEARTBEAT_S) if channel is not None else None)
        if command is None:
            continue
        if isinstance(command, Stop):
            break
        if isinstance(command, (CancelBatch, JoinText)):  # its batch has finished meanwhile
            continue
        if isinstance(command, RunBatch):
            reply = run_batch(pipe, parallel, control, metrics, command.batch, channel, show_progress)
        elif isinstance(command, RunText):
            reply = run_text(pipe, config.model_info, parallel, control, command.batch, channel)
        elif isinstance(command, CollectRoutingStats):
            reply = routing_summary(pipe, parallel, control)
        else:
            raise TypeError(f"unknown engine command {command!r}")
        if channel is not None:
            channel.send(Done(reply))
    if channel is not None:
        channel.send(Stopped())


def run_batch(pipe, parallel: ParallelState, control: ControlPlane, metrics: RankMetrics, batch: Batch, channel,
              show_progress: bool) -> BatchResult | None:
    start = time.perf_counter()
    items = batch.groups[parallel.dp.rank]
    on_step = None
    if channel is not None:
        def on_step(step: int, total: int):
            if channel.abandoned:  # rank 0 is a thread of a driver that has given up on this batch
                raise RuntimeError("the engine was closed during this batch")
            channel.send(Progress(batch.batch_id, step, total))
    should_stop = cancel_agreement(control, channel, batch.batch_id)

    # Previews: after the steps any image of the batch asks for one, every rank joins one gather
    # of the decode ranks' previews on rank 0.
    real = [item.request_id is not None for item in items]  # filler is denoised, never decoded
    gather_at = {step for group in batch.groups for item in group if item.request_id is not None
                 for step in preview_steps(item.num_inference_steps, item.partial_images)}

    def on_preview(step: int, previews: list):
        found = [(items[k].request_id, items[k].image_index, index, pixels.numpy()) for k, index, pixels in previews]
        parts = control.gather(found)
        if channel is not None:
            channel.send(PartialImages(batch.batch_id, [p for part in parts for p in part]))

    mine, cancelled_at = [], None
    try:
        denoised = denoise(pipe, items, parallel, metrics, on_step, show_progress, decode=real,
                           should_stop=should_stop, previews=(gather_at, on_preview))
    except BatchCancelled as e:
        denoised, cancelled_at = [], e.step
    if is_decode_rank(parallel):  # one rank per DP group reports its group's images
        mine = [ImageResult(item.request_id, item.image_index, item.seed, parallel.global_rank, d.latents,
                            None if d.pixels is None else d.pixels.numpy(), d.nonfinite_step, d.full_steps)
                for item, d in zip(items, denoised) if item.request_id is not None]
    parts = control.gather((mine, metrics.step_seconds, metrics.peak_memory_bytes))
    if parts is None:
        return None
    return BatchResult(batch.batch_id, [image for part in parts for image in part[0]], time.perf_counter() - start,
                       [part[1] for part in parts], [part[2] for part in parts], cancelled_at)


def run_text(pipe, info, parallel: ParallelState, control: ControlPlane, batch: TextBatchPlan,
             channel) -> TextResult | None:
    start = time.perf_counter()
    items = [list(group) for group in batch.groups]  # grows as text passes join, in the writers' order
    joins_taken = 0

    def on_tokens(written):
        if channel is None:
            return
        if channel.abandoned:
            raise RuntimeError("the engine was closed during this batch")
        tokens = {item.request_id: token for group, got in zip(items, written)
                  for item, token in zip(group, got) if item.request_id is not None and token is not None}
        if tokens:
            channel.send(TextTokens(batch.batch_id, tokens, tuple(sum(t is not None for t in got) for got in written),
                                    joins_taken))

    def check(step: int) -> TextCheck:
        """Rank 0's commands for this batch since the last check (a stop, text passes to join), on
        every rank."""
        nonlocal joins_taken
        stop, joining = False, [[] for _ in items]
        for command in commands_for(channel, batch.batch_id):
            if isinstance(command, CancelBatch):
                stop = True
            else:
                joins_taken += 1
                for group, more in zip(joining, command.groups):
                    group += more
        if not control.agree(stop or any(joining)):
            return TextCheck()
        stop, joining = control.broadcast((stop, joining))
        if stop:
            return TextCheck(stop=True)
        filler = replace(next(item for group in joining for item in group), request_id=None)
        joining = [group or [filler] for group in joining]  # every group runs the joining prefill
        for group, more in zip(items, joining):
            group += more
        return TextCheck(join=[[(item, item.request_id is not None) for item in group] for group in joining])

    cancelled_at, ids = None, None
    try:
        ids = write(pipe, info, [[(item, item.request_id is not None) for item in group] for group in batch.groups],
                    parallel, on_tokens, check)
    except BatchCancelled as e:
        cancelled_at = e.step
    if parallel.global_rank != 0:
        return None
    tokens = {} if ids is None else {item.request_id: row for group, rows in zip(items, ids)
                                     for item, row in zip(group, rows) if item.request_id is not None}
    return TextResult(batch.batch_id, tokens, time.perf_counter() - start, cancelled_at)


def cancel_agreement(control: ControlPlane, channel, batch_id: int):
    """should_stop(steps done) for a denoising batch's loop, on every rank: rank 0's answer, broadcast."""
    return lambda step: control.agree(any(isinstance(c, CancelBatch) for c in commands_for(channel, batch_id)))


def commands_for(channel, batch_id: int) -> list:
    """The driver's commands for this batch since the last look (rank 0; none elsewhere): it sends
    only CancelBatch and JoinText while a batch runs, and those of a batch that has ended are dropped."""
    commands = []
    while channel is not None and (command := channel.poll()) is not None:
        if not isinstance(command, (CancelBatch, JoinText)):
            raise RuntimeError(f"engine command {command!r} arrived while batch {batch_id} ran")
        if command.batch_id == batch_id:
            commands.append(command)
    return commands


def routing_summary(pipe, parallel: ParallelState, control: ControlPlane):
    """Per pipeline stage: its MoE layers, tokens per (layer, expert) since load, and the summary."""
    stats = None
    layers = moe_layers(pipe.transformer)
    if layers:
        s = collect_routing_stats(layers, parallel)
        stats = dict(stage=parallel.pp.rank, layers=pipe.moe_layer_ids,
                     tokens_per_expert=s.tokens_per_expert.tolist(), summary=s.summary())
    parts = control.gather(stats if parallel.ep.rank == 0 else None)
    return None if parts is None else [p for p in parts if p]
