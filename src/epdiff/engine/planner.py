"""Which images run next, on which data-parallel group.

The MoE layer couples the DP groups of an EP group layer by layer, so every DP group runs the
same number of forward passes: one batch is one prefill and N denoising steps on every group.
A group denoises images of one size and guidance together, whatever their prompts (prefixes of
different lengths are padded and masked); different groups may run different sizes. A group
with nothing to do repeats another group's first image as filler and drops the result.

Policy: the oldest waiting request always runs in the next batch (no request starves) and fixes
the step count; its images spread over the groups first (parallel beats batched), then the other
waiting requests with that step count fill what is left, in arrival order: an empty group first,
else the least-filled group already denoising that size and guidance, up to max_batch_size images.

A request whose model writes before it draws waits first for its text pass (one row per request):
a writing batch takes the waiting text passes (the oldest request first, spread over the groups,
an edit's alone in its group: its input images are its rows' prefix), and a request whose text is
written waits for its images in its place of arrival. While a writing batch runs, text passes that
arrive join it (`join_writing`: into the least-filled group up to max_batch_size rows writing,
no edit and none past an older edit), unless images wait (those run next, when the batch has
ended) or a row of the batch has ended (its images wait for the batch's end).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Sequence

from ..models.base import ImageTask, TextTask
from .params import SamplingParams


@dataclass(frozen=True)
class WorkItem(ImageTask):
    """An image of a request, as the planner places it and a family's pipeline draws it."""

    request_id: int | None  # None: filler, its result is dropped
    image_index: int  # within its request

    @property
    def lockstep_key(self) -> tuple:
        """What every DP group of a batch must share: the same model calls in the same order (their
        MoE collectives and step agreements pair up across groups): steps, solver, step cache."""
        return self.num_inference_steps, self.solver, self.cache

    @property
    def batch_key(self) -> tuple:
        """Images that can share one prefill and one denoising batch."""
        edit = self.request_id if self.images else None  # an edit's images share a batch with no other request's
        return self.height, self.width, self.num_inference_steps, self.guidance_scale, self.cache, self.solver, edit


@dataclass(frozen=True)
class TextItem(TextTask):
    """A request's text pass, as the planner places it."""

    request_id: int | None = field(kw_only=True)  # None: filler

    @property
    def batch_key(self):
        return self.request_id if self.images else None  # an edit's input images are its rows' prefix


@dataclass(frozen=True)
class TextBatchPlan:
    """A writing batch: the text passes of each DP group."""

    batch_id: int
    groups: tuple[tuple[TextItem, ...], ...]

    @property
    def items(self) -> list[TextItem]:
        return [item for group in self.groups for item in group if item.request_id is not None]


@dataclass(frozen=True)
class Batch:
    batch_id: int
    groups: tuple[tuple[WorkItem, ...], ...]  # one per DP group, each non-empty (filler where idle)

    @property
    def num_inference_steps(self) -> int:
        return self.groups[0][0].num_inference_steps

    @property
    def images(self) -> list[WorkItem]:
        return [item for group in self.groups for item in group if item.request_id is not None]


def work_items(request_id: int, params: SamplingParams) -> list[WorkItem]:
    """A resolved request's images (its text written, if it writes first)."""
    return [WorkItem(prompt=params.prompt, seed=params.image_seed(k), height=params.height, width=params.width,
                     num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                     cache=params.cache, solver=params.solver, system_prompt=params.system_prompt,
                     images=params.images, cot_text=params.cot_text or "", partial_images=params.partial_images,
                     request_id=request_id, image_index=k)
            for k in range(params.n)]


class BatchPlanner:
    def __init__(self, dp_size: int, max_batch_size: int, sequence_parallel_size: int = 1):
        self.dp_size, self.max_batch_size = dp_size, max_batch_size
        self.sequence_parallel_size = sequence_parallel_size  # a text pass chooses sizes it can split
        self._waiting: OrderedDict[int, list[WorkItem]] = OrderedDict()  # request id -> images not yet run
        self._writing: OrderedDict[int, TextItem] = OrderedDict()  # request id -> its text pass, not yet run
        self._ids = itertools.count()

    def add(self, request_id: int, params: SamplingParams) -> None:
        """A resolved request: its text pass, or (none, or written) its images, in arrival order
        (request ids grow with arrival)."""
        if params.writes_first:
            task = params.text_task(self.sequence_parallel_size)
            self._writing[request_id] = TextItem(**vars(task), request_id=request_id)
            return
        self._waiting[request_id] = work_items(request_id, params)
        for later in [i for i in self._waiting if i > request_id]:
            self._waiting.move_to_end(later)

    def cancel(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)
        self._writing.pop(request_id, None)

    def __len__(self) -> int:
        """Requests with work still to run."""
        return len(self._waiting) + len(self._writing)

    @property
    def num_images(self) -> int:
        """Rows the next batch could fill: images, or text passes."""
        return sum(len(items) for items in self._waiting.values()) + len(self._writing)

    @property
    def oldest(self) -> int | None:
        """The request id that the next batch starts with."""
        return min((next(iter(queue)) for queue in (self._waiting, self._writing) if queue), default=None)

    def next_batch(self) -> Batch | TextBatchPlan | None:
        oldest = self.oldest
        if oldest is None:
            return None
        if oldest in self._writing:
            return self._next_writing()
        lockstep = next(iter(self._waiting.values()))[0].lockstep_key
        groups: list[list[WorkItem]] = [[] for _ in range(self.dp_size)]
        for request_id, items in list(self._waiting.items()):
            if items[0].lockstep_key != lockstep:
                continue
            left = []
            for item in items:
                group = self._place(groups, item)
                (left if group is None else group).append(item)
            if left:
                self._waiting[request_id] = left
            else:
                del self._waiting[request_id]
            if all(len(g) == self.max_batch_size for g in groups):
                break
        filler = replace(next(g[0] for g in groups if g), request_id=None)
        return Batch(next(self._ids), tuple(tuple(g) if g else (filler,) for g in groups))

    def _next_writing(self) -> TextBatchPlan:
        groups: list[list[TextItem]] = [[] for _ in range(self.dp_size)]
        for request_id, item in list(self._writing.items()):
            group = self._place(groups, item)
            if group is not None:
                group.append(item)
                del self._writing[request_id]
        filler = replace(next(g[0] for g in groups if g), request_id=None)
        return TextBatchPlan(next(self._ids), tuple(tuple(g) if g else (filler,) for g in groups))

    def join_writing(self, rows: "WritingRows") -> tuple[tuple[TextItem, ...], ...] | None:
        """Waiting text passes for the writing batch under way (max_batch_size rows writing a group,
        counting those sent to join); None for none. None once a row of it has ended: its images
        wait for the batch's end, and rows joining would keep them waiting without bound."""
        if self._waiting or rows.any_ended:
            return None
        count = rows.rows()
        groups: list[list[TextItem]] = [[] for _ in count]
        for request_id, item in list(self._writing.items()):
            if item.images:  # an edit starts a batch of its own, and the passes after it wait for it
                break
            room = [g for g in range(len(count)) if count[g] + len(groups[g]) < self.max_batch_size]
            if not room:
                break
            groups[min(room, key=lambda g: count[g] + len(groups[g]))].append(item)
            del self._writing[request_id]
        return tuple(tuple(g) for g in groups) if any(groups) else None

    def _place(self, groups: list[list[WorkItem]], item: WorkItem) -> list[WorkItem] | None:
        for group in groups:
            if not group:
                return group
        same = [g for g in groups if g[0].batch_key == item.batch_key and len(g) < self.max_batch_size]
        return min(same, key=len) if same else None


class WritingRows:
    """The driver's count of a writing batch's rows, per DP group: those writing at the last step
    reported (TextTokens), and those sent to join that the worker has not taken yet (it takes
    JoinText at its checks, every 16 steps, and reports how many it has taken)."""

    def __init__(self, groups: Sequence[Sequence[TextItem]]):
        self.placed = [sum(item.request_id is not None for item in group) for group in groups]  # real rows taken
        self.writing = list(self.placed)
        self.sent: list[list[int]] = []  # per JoinText sent, its real rows per group
        self.taken = 0

    def join_sent(self, groups: Sequence[Sequence[TextItem]]) -> None:
        self.sent.append([len(group) for group in groups])

    def report(self, writing: Sequence[int], joins_taken: int) -> None:
        for counts in self.sent[self.taken:joins_taken]:
            self.placed = [p + c for p, c in zip(self.placed, counts)]
        self.writing, self.taken = list(writing), joins_taken

    def rows(self) -> list[int]:
        """Per group, the rows writing or sent to join."""
        pending = [sum(counts[g] for counts in self.sent[self.taken:]) for g in range(len(self.writing))]
        return [w + p for w, p in zip(self.writing, pending)]

    @property
    def any_ended(self) -> bool:
        return any(w < p for w, p in zip(self.writing, self.placed))
