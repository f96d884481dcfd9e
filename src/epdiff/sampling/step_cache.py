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
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import is_int

CACHE_KINDS = ("none", "taylor")
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
        return self

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def full_steps(self, num_steps: int) -> list[bool]:
        """For each step, whether it runs the model."""
        if not self.enabled:
            return [True] * num_steps
        full, skipped = [], 0
        for i in range(num_steps):
            run = (i == 0 or i < self.first_full or i >= num_steps - self.last_full
                   or skipped == self.interval - 1)
            skipped = 0 if run else skipped + 1
            full.append(run)
        return full

    def describe(self) -> str:
        if not self.enabled:
            return "none"
        return f"taylor (interval {self.interval}, order {self.order})"

    def extrapolator(self) -> "TaylorSeries | None":
        return TaylorSeries(self.order, self.first_full) if self.enabled else None


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
