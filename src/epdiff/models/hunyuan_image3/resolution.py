"""Aspect-ratio buckets of HunyuanImage-3.0 (the reference's ``ResolutionGroup``).

The model is trained on 33 buckets derived from ``image_base_size``; the bucket index is what the
``<img_ratio_k>`` token encodes, so index order must match the reference exactly:

* step = base // 16; start at (base, base);
* walk 1: height += step (capped at 2·base), width -= step (floored at base/2), until both caps hit;
* walk 2: the mirror image (height shrinks, width grows);
* sort all buckets by height / width ascending.

For base 1024 that gives index 0 = 512 (h) × 2048 (w), index 16 = 1024 × 1024 and
index 32 = 2048 (h) × 512 (w). Buckets are (height, width) throughout this module.

Small bases (64, 128, ...) give sides such as 68 or 120 that the VAE (factor 16) cannot produce.
The reference then simply floors the latent grid (``side // 16``), so the image it actually makes is
``side // 16 * 16`` pixels. We round each bucket side down to the factor in the same way, which
reproduces the reference's latent grid for every base; for bases that are multiples of 256
(including the release's 1024) the rounding changes nothing.

The Instruct models' code appends four fixed buckets after the 33 (`INSTRUCT_EXTRA_BUCKETS`:
1024×768, 1280×720, 768×1024 and 720×1280, height × width, each where its ratio is not among the
33), indices 33 to 36, whose <img_ratio_k> tokens the Instruct tokenizers hold.
"""

from __future__ import annotations

NUM_RATIO_BUCKETS = 33
# The Instruct code's extra buckets, (height, width) in pixels, whatever the base (its image processor).
INSTRUCT_EXTRA_BUCKETS = ((1024, 768), (1280, 720), (768, 1024), (720, 1280))
MAX_ASPECT = 4  # the extreme buckets are base/2 : 2·base, i.e. 1:4 and 4:1


def _step_toward(value: int, target: int, step: int) -> int:
    return min(value + step, target) if target > value else max(value - step, target)


def _exact_buckets(base_size: int) -> list[tuple[int, int]]:
    step = base_size // 16
    low, high = base_size // 2, base_size * 2
    buckets = [(base_size, base_size)]
    # Two walks from the square: towards tall (2·base x base/2) and towards wide (base/2 x 2·base).
    # Each side moves one step at a time and stays at its limit once there, as in the reference.
    for target_h, target_w in ((high, low), (low, high)):
        h = w = base_size
        while (h, w) != (target_h, target_w):
            h, w = _step_toward(h, target_h, step), _step_toward(w, target_w, step)
            buckets.append((h, w))
    # Python's sort is stable, like the reference's sorted(); the ratios are distinct anyway.
    return sorted(buckets, key=lambda hw: hw[0] / hw[1])


class ResolutionGroup:
    """The 33 (height, width) buckets for one ``image_base_size``, sides multiples of ``factor``."""

    def __init__(self, base_size: int, factor: int = 16, extra: tuple[tuple[int, int], ...] = ()):
        """extra: fixed buckets appended after the 33 where their ratio is new (the Instruct models')."""
        if not isinstance(base_size, int) or base_size <= 0 or base_size % 16:
            # base % 16 != 0 would make the walks take more than 16 steps and the bucket
            # count would no longer match the 33 <img_ratio_k> tokens.
            raise ValueError(f"image_base_size must be a positive multiple of 16, got {base_size!r}")
        if factor <= 0 or base_size // 2 < factor:
            raise ValueError(
                f"image_base_size {base_size} is too small for factor {factor}: the narrowest "
                f"bucket side ({base_size // 2}) must be at least {factor}"
            )
        self.base_size = base_size
        self.factor = factor
        self.exact_buckets = _exact_buckets(base_size)
        assert len(self.exact_buckets) == NUM_RATIO_BUCKETS, len(self.exact_buckets)
        self.buckets = [(h // factor * factor, w // factor * factor) for h, w in self.exact_buckets]
        # Chosen from the exact (unrounded) ratios, like the reference, so that the ratio index
        # agrees with it even where rounding makes two small-base buckets the same size.
        self.ratios = [h / w for h, w in self.exact_buckets]
        for h, w in extra:
            if h / w not in self.ratios:
                self.exact_buckets.append((h, w))
                self.buckets.append((h // factor * factor, w // factor * factor))
                self.ratios.append(h / w)

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, ratio_index: int) -> tuple[int, int]:
        return self.bucket(ratio_index)

    def bucket(self, ratio_index: int) -> tuple[int, int]:
        """(height, width) in pixels of bucket ``ratio_index``."""
        if not isinstance(ratio_index, int) or not 0 <= ratio_index < len(self.buckets):
            raise ValueError(f"ratio index must be in [0, {len(self.buckets) - 1}], got {ratio_index!r}")
        return self.buckets[ratio_index]

    def grid(self, ratio_index: int) -> tuple[int, int]:
        """(height, width) of the latent / token grid of bucket ``ratio_index``."""
        h, w = self.bucket(ratio_index)
        return h // self.factor, w // self.factor

    def ratio_index(self, height: int, width: int) -> int:
        """Bucket nearest in height/width ratio (absolute difference; the first wins a tie)."""
        _check_request(height, width)
        ratio = height / width
        distances = [abs(r - ratio) for r in self.ratios]
        return distances.index(min(distances))

    def nearest_index(self, height: int, width: int) -> int:
        """ratio_index without the aspect limit: an input image (an edit's) beyond 4:1 takes the
        extreme bucket, as the reference's nearest-ratio choice does."""
        distances = [abs(r - height / width) for r in self.ratios]
        return distances.index(min(distances))

    def snap(self, height: int, width: int) -> tuple[int, int, int]:
        """(ratio_index, height, width) of the bucket for a requested size; only its ratio matters."""
        index = self.ratio_index(height, width)
        return (index, *self.buckets[index])


def _check_request(height, width) -> None:
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, (int, float)) or side <= 0:
            raise ValueError(
                f"requested size {height}x{width} (HxW): {name} must be a positive number"
            )
    # Beyond the extreme buckets the reference would silently clamp to 1:4 / 4:1; refuse instead.
    if height > MAX_ASPECT * width or width > MAX_ASPECT * height:
        raise ValueError(
            f"requested size {height}x{width} (HxW) has aspect ratio {height / width:.4g} (H/W); "
            f"the allowed range is 1:{MAX_ASPECT} to {MAX_ASPECT}:1 (H/W from {1 / MAX_ASPECT} to "
            f"{MAX_ASPECT})"
        )


_GROUPS: dict[tuple[int, int], ResolutionGroup] = {}


def resolution_group(base_size: int, factor: int = 16, extra: tuple = ()) -> ResolutionGroup:
    """Cached ResolutionGroup (the buckets are pure functions of base, factor and extra)."""
    key = (base_size, factor, tuple(extra))
    if key not in _GROUPS:
        _GROUPS[key] = ResolutionGroup(base_size, factor, tuple(extra))
    return _GROUPS[key]


def snap(height: int, width: int, base_size: int, factor: int = 16) -> tuple[int, int, int]:
    """Snap a requested (height, width) to a bucket: returns (ratio_index, height, width)."""
    return resolution_group(base_size, factor).snap(height, width)
