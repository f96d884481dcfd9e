"""Step caching: skip the model on denoising steps that barely change (docs/architecture.md, 'Step
caching'). Independent of the model family: it runs in the engine's loop, on the combined velocity.

`taylor` follows the schedule and defaults of Tencent's reference (`--use-taylor-cache` in its
run_image_gen.py): a full step at step 0, at each of the first `first_full` steps and the last
`last_full` steps, and after every `interval - 1` skipped steps; on the other steps the velocity
is extrapolated from the last `order + 1` full steps (the chain starts at the last of the first
steps, as there). Where epdiff differs from the reference, and why:
- the derivative chain: the reference takes derivative k as the difference of derivative k - 1
  between the last two full steps over their distance, and sums d^k/k! times them (TaylorSeer).
  A backward difference is the derivative half a step back, not at the last step, so that series
  is wrong already for a parabola (it misses by h·f''·d/2, h the distance between full steps, d
  the distance from the last one). epdiff uses
  Newton's divided differences over the last order + 1 full steps, the polynomial of that order
  through them: exact for every polynomial of the order, whatever the spacing
  (tests/test_step_cache.py shows both);
- the reference extrapolates the backbone's last hidden state and runs the final layer on it;
  epdiff extrapolates the model's whole prediction (after guidance), so a skipped step makes no
  model call and no collective on any rank, for every family alike;
- the reference splits the hidden state into FFT low and high frequencies with an order each (both
  2 by default, so the split changes nothing in exact arithmetic); epdiff keeps one series;
- the default order is 1, not 2 (measured, see `StepCacheConfig.order`).
The schedule depends only on the step count and the settings, so every rank skips the same steps
with no collective to agree on it.

`fbcache` (first-block cache, as cache-dit's DBCache with one front block and TeaCache do it): the
model runs its first block every step; when that block's output has changed, relative to the last
full step, by less than `threshold` (the norm of the change over the norm, summed over every rank's
tokens in one small all-reduce, so every rank decides alike), the other blocks are skipped and
their cached residual (their output minus their input at the last full step) is added instead.
Each pipeline stage caches its own blocks' residual. The first `first_full` and last `last_full`
steps run in full, and so does every `interval`-th step in a row. The family runs its blocks
through `FirstBlockCache.run` (ModelInfo.supports_block_cache).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from ..config import is_int

CACHE_KINDS = ("none", "taylor", "fbcache")
MAX_TAYLOR_ORDER = 4


@dataclass(frozen=True)
class StepCacheConfig:
    kind: str = "none"
    interval: int = 5  # taylor: at most interval - 1 skipped steps between two full ones
    # taylor: the polynomial's order. The reference's default is 2; on the built-in model at 50
    # steps, interval 5, order 2 overshoots (worst image 16 dB, 40 extra objects in 120) where
    # order 1 keeps every image right (42 dB mean): BENCHMARKS.md §16.
    order: int = 1
    first_full: int = 3  # the first steps always run the model (the reference's first-enhance steps)
    last_full: int = 1  # so do the last ones (its tailing-enhance steps)
    threshold: float = 0.08  # fbcache: the first block's relative change under which a step is skipped

    def check(self) -> "StepCacheConfig":
        """ValueError naming the field and the value."""
        if self.kind not in CACHE_KINDS:
            raise ValueError(f"cache {self.kind!r} is not one epdiff has; choose one of {', '.join(CACHE_KINDS)}")
        if not is_int(self.interval) or self.interval < 1:
            raise ValueError(f"cache interval must be a positive integer, got {self.interval!r}")
        if not is_int(self.order) or not 0 <= self.order <= MAX_TAYLOR_ORDER:
            raise ValueError(f"cache order must be an integer in [0, {MAX_TAYLOR_ORDER}], got {self.order!r}")
        for name in ("first_full", "last_full"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"cache {name} must be a non-negative integer, got {value!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"cache threshold must be a positive number, got {t!r}")
        return self

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def may_skip(self, step: int, num_steps: int, skipped_in_a_row: int) -> bool:
        return (self.first_full <= step < num_steps - self.last_full and step > 0
                and skipped_in_a_row < self.interval - 1)

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each step, whether the loop calls the model (taylor skips whole steps; fbcache calls
        the model every step and decides inside it)."""
        if self.kind != "taylor":
            return [True] * num_steps
        full, skipped = [], 0
        for i in range(num_steps):
            run = not self.may_skip(i, num_steps, skipped)
            skipped = 0 if run else skipped + 1
            full.append(run)
        return full

    def describe(self) -> str:
        if self.kind == "taylor":
            return f"taylor (interval {self.interval}, order {self.order})"
        if self.kind == "fbcache":
            return f"fbcache (threshold {self.threshold:g}, interval {self.interval})"
        return "none"

    def extrapolator(self) -> "TaylorSeries | None":
        return TaylorSeries(self.order, self.first_full) if self.kind == "taylor" else None

    def block_cache(self, num_steps: int, group) -> "FirstBlockCache | None":
        """group: every rank of the layout (ParallelState.world), which decides together."""
        return FirstBlockCache(self, num_steps, group) if self.kind == "fbcache" else None


class TaylorSeries:
    """A value extrapolated in the step index from the last order + 1 full steps: Newton's form of
    the polynomial through them, differences[k] = f[x_n, ..., x_{n-k}] (x_n the last full step)."""

    def __init__(self, order: int, first_full: int):
        self.order, self.first_full = order, first_full
        self.differences: list = []
        self.steps: list[int] = []  # the full steps the differences span, the last first
        self.last_step: int | None = None

    def record(self, step: int, value) -> None:
        """The value a full step computed."""
        if step >= self.first_full - 1:  # the first steps only start the chain with their last
            new = [value]
            for k in range(min(self.order, len(self.differences))):
                new.append((new[k] - self.differences[k]) / (step - self.steps[k]))
            self.differences = new
            self.steps = [step] + self.steps[:self.order]
        self.last_step = step

    def predict(self, step: int):
        """The value at a skipped step."""
        out, product = 0, 1.0
        for k, difference in enumerate(self.differences):
            out = out + difference * product
            product *= step - self.steps[k]
        return out


class FirstBlockCache:
    """One batch's first-block cache on one rank: `run` is called by the model's forward, once per
    step, with this stage's blocks (each a function of the hidden state)."""

    def __init__(self, config: StepCacheConfig, num_steps: int, group):
        self.config, self.num_steps, self.group = config, num_steps, group
        self.step = -1
        self.skipped_in_a_row = 0
        self.full_steps = 0
        self.previous = None  # the first block's output at the last full step (stage 0)
        self.residual = None  # this stage's blocks' output minus their input at the last full step

    def begin_step(self, step: int) -> None:
        self.step = step

    def decide_ahead(self) -> bool:
        """A later pipeline stage's part of the decision: called before it receives its input, so
        that the first stage's decision (taken after its first block) does not wait on it."""
        return self._skip(None)

    def run(self, x, blocks: Sequence[Callable], first_stage: bool, decided: bool | None = None):
        """x through the blocks, or through the first (on the first stage) plus the cached residual.
        decided: a later stage's decide_ahead()."""
        start = x
        if first_stage:
            start, blocks = blocks[0](x), blocks[1:]
        if self._skip(start) if first_stage else decided:
            self.skipped_in_a_row += 1
            return start + self.residual
        out = start
        for block in blocks:
            out = block(out)
        self.residual = out - start
        if first_stage:
            self.previous = start
        self.skipped_in_a_row = 0
        self.full_steps += 1
        return out

    def _skip(self, probe) -> bool:
        import torch
        import torch.distributed as dist

        # What every rank knows alike decides first: no collective on the steps that must run.
        if self.residual is None or not self.config.may_skip(self.step, self.num_steps, self.skipped_in_a_row):
            return False
        device = self.residual.device
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        if probe is not None:
            sums[0] = (probe.double() - self.previous.double()).pow(2).sum()
            sums[1] = self.previous.double().pow(2).sum()
        if self.group.size > 1:  # every rank's tokens, every branch and stage: one decision
            dist.all_reduce(sums, group=self.group.process_group)
        change, base = sums.tolist()  # the one host sync of a step that may skip
        return change <= (self.config.threshold ** 2) * base


def run_blocks(x, blocks: Sequence[Callable], cache: FirstBlockCache | None, first_stage: bool,
               decided: bool | None = None):
    """A model's blocks in order, through the first-block cache where one runs."""
    if cache is not None:
        return cache.run(x, blocks, first_stage, decided)
    for block in blocks:
        x = block(x)
    return x
