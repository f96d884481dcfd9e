"""The writing loop, once for every family that writes before it draws (docs/architecture.md,
'Writing text'): one token per row per step, on every rank of the layout in lockstep.

A batch holds rows on every DP group (a group with nothing to write runs filler, dropped). Each
step the family's model gives each row's next-token logits on its last stage; one rank of each DP
group (the last stage's first TP/SP/CFG rank) picks the tokens, following each row's TextRules
(forced tokens, a choice among some tokens, stops, the budget) and its sampling settings with a
generator seeded per request; the replica group receives them, and one all-gather over DP gives
every rank every group's tokens, so every rank follows every row's rules on the host and all agree,
with no further collective, when the last real row has ended. The MoE layers couple the DP groups
layer by layer, so a group whose rows have ended keeps stepping (its tokens are dropped) until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..distributed.collectives import all_gather_tensor
from ..distributed.parallel_state import ParallelState, rank_grid
from ..models.base import ImagePipeline, ModelInfo, TextRules, TextSampling, TextTask
from .denoise import BatchCancelled

# Steps between two cancellation checks (each is a broadcast over the control group).
CANCEL_CHECK_EVERY = 16
# The token a row "writes" when its logits were not finite (NaN or inf): it ends, its request fails.
NONFINITE = -2
# Sampling at a temperature below this is greedy, as vLLM takes it: logits divided by a tinier one
# overflow fp32, and the sampler fails on the infinities (on a GPU, a device-side assert).
GREEDY_BELOW = 1e-5


@dataclass
class RowWriter:
    """One row's tokens and where it stands in its rules (the same on every rank)."""

    rules: TextRules
    budget: int
    ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    fired: set = field(default_factory=set)
    done: bool = False
    closed: bool = False  # the closing has been forced

    def forced(self) -> int | None:
        return self.pending[0] if self.pending else None

    def choices(self) -> Sequence[int] | None:
        """The tokens the next one must come from, or None (any)."""
        return self.rules.choose_from.get(self.ids[-1]) if self.ids else None

    def push(self, token: int) -> None:
        """token: the row's next one, or NONFINITE (its logits were not finite: it ends there)."""
        self.ids.append(token)
        if token == NONFINITE:
            self.done = True
            return
        if self.pending and token == self.pending[0]:
            self.pending.pop(0)
        if token in self.rules.stops:
            self.done = True
            return
        if token in self.rules.forced and token not in self.fired:
            self.fired.add(token)
            self.pending = list(self.rules.forced[token])
        if len(self.ids) >= self.budget and not self.pending and self.choices() is None:
            if self.rules.closing and not self.closed:  # also where a forced run took it past the budget
                self.closed, self.pending = True, list(self.rules.closing)
            else:
                self.done = True
        if len(self.ids) >= self.rules.most_tokens(self.budget):
            self.done = True


def pick(logits: torch.Tensor, sampling: TextSampling, generator: torch.Generator | None) -> torch.Tensor:
    """One row's next token from its logits [vocab] (fp32): greedy at a temperature below
    GREEDY_BELOW (0 included), else sampled after temperature, top-k and top-p (transformers'
    order and cut-offs)."""
    if sampling.temperature < GREEDY_BELOW:
        return logits.argmax()
    scores = logits / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[-1] = False  # keep at least the likeliest
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]


def sampler_rank(parallel: ParallelState) -> int:
    """The global rank that picks its DP group's tokens: the last stage's, TP, SP and CFG index 0."""
    return int(rank_grid(parallel.config)[-1, parallel.dp.rank, 0, 0, 0])  # (pp, dp, cfg, sp, tp)


@dataclass(frozen=True)
class TextCheck:
    """What every rank does at a check of a writing batch (rank 0's answer, broadcast): stop it, or
    let rows join it (join[g]: the (task, real) rows that join DP group g; a group that gets none
    while others do gets a filler row, not real, so that every group runs the joining prefill)."""

    stop: bool = False
    join: Sequence[Sequence[tuple[TextTask, bool]]] | None = None


@torch.inference_mode()
def write(pipe: ImagePipeline, info: ModelInfo, groups: Sequence[Sequence[tuple[TextTask, bool]]],
          parallel: ParallelState, on_tokens: Callable[[list[list[int | None]]], None] | None = None,
          check: Callable[[int], TextCheck] | None = None) -> list[list[list[int]]]:
    """Runs the text passes of a batch: groups[g] the (task, real) rows of DP group g (filler rows
    are not real: they step but never count). Returns every group's rows' tokens (on every rank),
    the rows that joined after the first ones; a row whose logits were not finite ends with NONFINITE.
    on_tokens(tokens[g][r]) after each step: the token each row wrote (None: it had ended), rows
    numbered as returned. check(steps done) is asked every CANCEL_CHECK_EVERY steps on every rank
    and must answer alike (the worker's: rank 0's, broadcast): stop raises BatchCancelled; rows to
    join are prefilled (TextBatch.join) and write from the next step on, after the rows that have
    ended leave the batch (TextBatch.compact). A batch whose rows have all ended ends."""
    device = parallel.device
    rows = [[RowWriter(info.text_rules(task), task.sampling.max_new_tokens, done=not real) for task, real in group]
            for group in groups]
    steps = max((row.rules.most_tokens(row.budget) for group in rows for row in group if not row.done), default=0)
    mine = [task for task, _ in groups[parallel.dp.rank]]
    batch = pipe.start_text(mine, steps)
    picker = parallel.global_rank == sampler_rank(parallel)
    generators = [torch.Generator(device=device).manual_seed(task.seed) for task in mine] if picker else []
    logits = batch.logits
    held = [list(range(len(group))) for group in rows]  # the rows each group's batch holds, in its order
    step = 0
    while not all(row.done for group in rows for row in group):
        if picker:
            # Overflowed logits fail their row, on the device (no sync): a NaN would make the
            # sampler fail, and an argmax of one write a token from nothing.
            bad = ~torch.isfinite(logits).all(-1)
            logits = torch.nan_to_num(logits, nan=0.0)
            writers = [rows[parallel.dp.rank][i] for i in held[parallel.dp.rank]]
            tokens = torch.stack([_choose(row, logits[r], task.sampling, generators[r])
                                  for r, (row, task) in enumerate(zip(writers, mine))])
            tokens = torch.where(bad, NONFINITE, tokens)
        else:
            tokens = torch.empty(len(mine), dtype=torch.long, device=device)
        if parallel.replica.size > 1:
            dist.broadcast(tokens, src=sampler_rank(parallel), group=parallel.replica.process_group)
        padded = torch.full((max(len(h) for h in held),), -1, dtype=torch.long, device=device)
        padded[:len(mine)] = tokens
        every = all_gather_tensor(padded, parallel.dp).tolist()  # the step's one host sync
        written = [[None] * len(group) for group in rows]
        for g, (group, got) in enumerate(zip(rows, every)):
            for i, token in zip(held[g], got):
                if not group[i].done:
                    written[g][i] = token
                    group[i].push(token)
        if on_tokens is not None:
            on_tokens(written)
        step += 1
        if all(row.done for group in rows for row in group):
            break
        checked = check(step) if check is not None and step % CANCEL_CHECK_EVERY == 0 else TextCheck()
        if checked.stop:
            raise BatchCancelled(step)
        logits = batch.step(tokens.clamp_min(0))  # a failed row steps on with any token
        if checked.join:
            _check_join(batch, checked.join)
            keep = [[p for p, i in enumerate(h) if not group[i].done] for h, group in zip(held, rows)]
            mine_keep = keep[parallel.dp.rank]
            if len(mine_keep) < len(mine):  # the rows that have ended leave the batch
                batch.compact(mine_keep)
                mine = [mine[p] for p in mine_keep]
                if picker:
                    generators = [generators[p] for p in mine_keep]
                logits = None if logits is None else logits[torch.tensor(mine_keep, device=device, dtype=torch.long)]
            held = [[h[p] for p in k] for h, k in zip(held, keep)]
            joined = _join(info, checked.join, rows, held, parallel)
            mine += joined
            if picker:
                generators += [torch.Generator(device=device).manual_seed(task.seed) for task in joined]
            room = max(info.text_rules(task).most_tokens(task.sampling.max_new_tokens) for task in joined)
            new_logits = batch.join(joined, room)
            logits = new_logits if logits is None or not len(logits) else torch.cat([logits, new_logits])
    return [[row.ids for row in group] for group in rows]


def _check_join(batch, join: Sequence[Sequence[tuple[TextTask, bool]]]) -> None:
    if batch.join is None or batch.compact is None:
        raise RuntimeError("rows were sent to join a text pass that cannot take them (a family's without "
                           "TextBatch.join)")
    if not all(join):
        raise RuntimeError("every DP group must take a row (a filler where none joins it) in a join")


def _join(info: ModelInfo, join: Sequence[Sequence[tuple[TextTask, bool]]], rows: list[list[RowWriter]],
          held: list[list[int]], parallel: ParallelState) -> list[TextTask]:
    """Adds the joining rows to every group's writers and held rows; returns this group's tasks."""
    for group, h, joining in zip(rows, held, join):
        h += range(len(group), len(group) + len(joining))
        group += [RowWriter(info.text_rules(task), task.sampling.max_new_tokens, done=not real)
                  for task, real in joining]
    return [task for task, _ in join[parallel.dp.rank]]


def _choose(row: RowWriter, logits: torch.Tensor, sampling: TextSampling, generator) -> torch.Tensor:
    forced = row.forced()
    if row.done or forced is not None:
        token = forced if forced is not None else (row.ids[-1] if row.ids else 0)
        return torch.tensor(token, device=logits.device)
    choices = row.choices()
    if choices is not None:
        allowed = torch.tensor(list(choices), device=logits.device)
        return allowed[logits[allowed].argmax()]
    return pick(logits, sampling, generator)
