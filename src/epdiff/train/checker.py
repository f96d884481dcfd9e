"""Reads a picture of coloured shapes back into objects, and scores it against a caption, strictly.

Pixels are sorted by hue into the palette colours (white, grey and black are background), each
colour's mask is opened (3x3) to drop specks and whiskers and split into 8-connected components,
and each component of at least MIN_AREA of the image is read as one object:

    position  the bounding-box centre: in the middle third of both axes = centre, otherwise the
              side whose axis it is farthest out along (left/right or top/bottom);
    size      the bounding box's longer side, as a fraction of the image side, > LARGE_EXTENT = large;
    shape     the fill ratio area / bounding-box area: square 1.0, circle pi/4, triangle 0.5; a
              centroid well below the box centre also says triangle (it survives blur better).

The bounding-box centre, not the pixel centroid, gives the position: it is where the renderer
puts the shape, and a triangle's centroid sits a sixth of its height below it.

Scoring is strict: every asked-for object has four attributes (shape, colour, position, size),
each right or wrong; an object drawn that was not asked for (a second shape, a blotch of another
colour) is an extra, an error of its own; a scene is exactly right only when every attribute of
every object is right and nothing else is drawn.

    python -m epdiff.train.checker --pair "a small red circle on the left" image.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from .shapes import COLOURS, PALETTE, Scene, ShapeObject, caption, object_phrase, parse_caption

WORK_SIDE = 128  # larger images are box-downscaled to this first: detail enough, bounded cost
MIN_CHROMA = 60.0  # max - min over RGB (0-255); white, greys, black and faint noise fall below
MIN_HUE_COSINE = 0.85  # a pixel whose hue is far from every palette colour is background
# Of the image: smaller components are specks. 0.4 % is an 8 x 8 blotch at 128 x 128, a quarter of
# the smallest drawn shape (a small triangle, 1.7 %): a patch of another colour that size inside a
# shape is plain to see, and is read as an object of its own (an extra).
MIN_AREA = 0.004
LARGE_EXTENT = 0.3  # small shapes are drawn at 0.2 (+-8 %) of the side, large ones at 0.4
# Shape thresholds. Drawn shapes read: fill square 1.0, circle 0.78-0.79, triangle 0.54-0.61 (the
# opening blunts its apex); centroid drop triangle 0.13-0.15, others 0. Blur and noise pull square
# and circle fills together (0.81+ and 0.84-) and small triangles' drop down (0.06+), hence:
SQUARE_FILL = 0.86  # fill above: square
CIRCLE_FILL = 0.64  # fill below: triangle
TRIANGLE_DROP = 0.05  # centroid below the box centre by more than this many box heights: triangle
ATTRIBUTES = ("shape", "colour", "position", "size")  # what accuracy counts, per asked-for object


def _hue_directions(rgb: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Unit vectors of rgb - low (the least channel), over the first dim.

    Blending a colour with white or grey adds the same amount to every channel and darkening
    scales it, so this direction survives anti-aliased edges, blur and shading.
    """
    shifted = rgb - low
    return shifted / shifted.norm(dim=0, keepdim=True).clamp_min(1e-6)


_PALETTE_RGB = torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32).t()  # [3, colours]
_PALETTE_DIRECTIONS = _hue_directions(_PALETTE_RGB, _PALETTE_RGB.min(dim=0).values).t()  # [colours, 3]


def _load(image) -> Image.Image:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    image = image.convert("RGB")
    if max(image.size) > WORK_SIDE:
        scale = WORK_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BOX)
    return image


class Component(NamedTuple):
    area: int
    left: int  # bounding box in pixels, right and bottom exclusive
    right: int
    top: int
    bottom: int
    centroid_y: float  # in pixels, from the top edge


def _components(masks: torch.Tensor) -> list[list[Component]]:
    """The 8-connected components of each [H, W] bool mask of [N, H, W].

    Works on horizontal runs of pixels, joined by union-find where runs on neighbouring rows touch:
    a drawn shape is one run per row, so this is a few hundred steps of Python per image.
    """
    count, height, width = masks.shape
    padded = torch.zeros(count, height, width + 2, dtype=torch.bool)
    padded[:, :, 1:-1] = masks
    edges = (padded[:, :, 1:] != padded[:, :, :-1]).nonzero().tolist()  # alternately run start, run end
    rows = {}  # (mask, row) -> [(run id, start, end)], by start
    for i, ((mask, row, start), (_, _, end)) in enumerate(zip(edges[0::2], edges[1::2])):
        rows.setdefault((mask, row), []).append((i, start, end))

    parent = list(range(len(edges) // 2))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (mask, row), runs in rows.items():
        above = rows.get((mask, row - 1), [])
        first = 0
        for i, start, end in runs:
            while first < len(above) and above[first][2] < start:  # ends before this run, even diagonally
                first += 1
            k = first
            while k < len(above) and above[k][1] <= end:
                parent[root(i)] = root(above[k][0])
                k += 1

    stats = [{} for _ in range(count)]  # per mask: root -> [area, left, right, top, bottom, sum of y]
    for (mask, row), runs in rows.items():
        for i, start, end in runs:
            box = stats[mask].setdefault(root(i), [0, start, end, row, row + 1, 0.0])
            box[0] += end - start
            box[1], box[2], box[4] = min(box[1], start), max(box[2], end), row + 1  # rows come in order
            box[5] += (row + 0.5) * (end - start)
    return [[Component(*box[:5], box[5] / box[0]) for box in per_mask.values()] for per_mask in stats]


def _dilate(masks: torch.Tensor) -> torch.Tensor:
    """3x3 dilation of [N, H, W] bool masks (separable)."""
    padded = F.pad(masks, (1, 1, 1, 1))
    rows = padded[:, :, :-2] | padded[:, :, 1:-1] | padded[:, :, 2:]
    return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _open(masks: torch.Tensor) -> torch.Tensor:
    """Morphological opening: drops specks and one-pixel whiskers, which would stretch a bounding box."""
    return _dilate(~_dilate(~masks))


def _position(x: float, y: float) -> str:
    if 1 / 3 <= x <= 2 / 3 and 1 / 3 <= y <= 2 / 3:
        return "centre"
    if abs(x - 0.5) >= abs(y - 0.5):
        return "left" if x < 0.5 else "right"
    return "top" if y < 0.5 else "bottom"


def _shape(c: Component) -> str:
    height = c.bottom - c.top
    fill = c.area / ((c.right - c.left) * height)
    # An upward triangle's mass sits h/6 below its box centre, where a circle's or square's sits at
    # it; blur fattens a small triangle towards a circle's fill ratio but keeps most of that offset.
    drop = (c.centroid_y - (c.top + c.bottom) / 2) / height
    if fill < CIRCLE_FILL or drop > TRIANGLE_DROP:
        return "triangle"
    return "square" if fill > SQUARE_FILL else "circle"


def detect(image) -> list[ShapeObject]:
    """The objects in an image (a PIL image or a path), largest first."""
    image = _load(image)
    width, height = image.size
    rgb = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    rgb = rgb.permute(2, 0, 1).float()
    low, high = rgb.min(dim=0).values, rgb.max(dim=0).values
    hues = _hue_directions(rgb, low)
    cosine, colour_index = torch.einsum("kc,chw->khw", _PALETTE_DIRECTIONS, hues).max(dim=0)
    chroma = high - low
    coloured = (chroma >= MIN_CHROMA) & (cosine >= MIN_HUE_COSINE)
    min_area = MIN_AREA * width * height

    found = []  # (area, object)
    present = colour_index[coloured].unique().tolist()
    if not present:
        return []
    masks = coloured & (colour_index[None] == torch.tensor(present).view(-1, 1, 1))
    for k, components in zip(present, _components(_open(masks))):
        for c in components:
            if c.area < min_area:
                continue
            obj = ShapeObject(
                shape=_shape(c),
                colour=COLOURS[k],
                position=_position((c.left + c.right) / 2 / width, (c.top + c.bottom) / 2 / height),
                size="large" if max((c.right - c.left) / width, (c.bottom - c.top) / height) > LARGE_EXTENT
                else "small",
            )
            found.append((c.area, obj))
    found.sort(key=lambda pair: -pair[0])
    return [obj for _, obj in found]


def _asked(expected: ShapeObject) -> list[str]:
    """The attributes a caption asks for (a partial caption leaves out size or position)."""
    return [n for n in ATTRIBUTES if getattr(expected, n) is not None]


def _agreement(expected: ShapeObject, seen: ShapeObject | None) -> dict[str, bool]:
    return {n: seen is not None and getattr(expected, n) == getattr(seen, n) for n in _asked(expected)}


def score(scene_or_caption: Scene | str, image) -> dict:
    """How well the image shows the scene, strictly.

    Each asked-for object is paired with a different detected object (or none), choosing the
    pairing that gets most attributes right, then the largest detections. A missing object gets
    all its attributes wrong; every detection left unpaired is an extra object. accuracy = right
    attributes / the attributes asked for (4 per object, fewer where a caption leaves out size or
    position); exact = all of them right and no extra object.
    """
    scene = parse_caption(scene_or_caption) if isinstance(scene_or_caption, str) else scene_or_caption
    detected = detect(image)
    expected = scene.objects
    # Beyond a few detections the best pairing is all but certainly among the largest ones; the
    # others are extras whatever the pairing.
    candidates = detected[:8] + [None] * len(expected)
    best = None
    for pairing in itertools.permutations(range(len(candidates)), len(expected)):
        agreements = [_agreement(e, candidates[i]) for e, i in zip(expected, pairing)]
        right = sum(sum(a.values()) for a in agreements)
        if best is None or right > best[0]:  # strict: earlier (larger) detections win ties
            best = (right, agreements, pairing)
    right, agreements, pairing = best
    matched = sum(candidates[i] is not None for i in pairing)
    total = sum(len(_asked(e)) for e in expected)
    extra = len(detected) - matched
    return {
        "caption": caption(scene),
        "attributes": right,
        "total": total,
        "accuracy": right / total,
        "per_attribute": {n: sum(a.get(n, False) for a in agreements) for n in ATTRIBUTES},
        "asked": {n: sum(n in a for a in agreements) for n in ATTRIBUTES},
        "objects": len(expected),
        "missing": len(expected) - matched,
        "extra": extra,
        "exact": right == total and extra == 0,
        "detected": [object_phrase(o) for o in detected],
    }


def summarize(scores: list[dict]) -> dict:
    """Totals of `score` results, with a printable one-line "report"."""
    attributes = sum(s["attributes"] for s in scores)
    total = sum(s["total"] for s in scores)
    exact = sum(s["exact"] for s in scores)
    summary = {
        "images": len(scores),
        "attributes": attributes,
        "total": total,
        "accuracy": attributes / total if total else 0.0,
        # each attribute's share right, over the objects whose caption asked for it
        "per_attribute": {n: sum(s["per_attribute"][n] for s in scores) / max(sum(s["asked"][n] for s in scores), 1)
                          for n in ATTRIBUTES},
        "exact_scenes": exact,
        "exact": exact / max(len(scores), 1),
        "missing": sum(s["missing"] for s in scores),
        "extra": sum(s["extra"] for s in scores),
        "scores": scores,
    }
    per = "  ".join(f"{n} {v:.1%}" for n, v in summary["per_attribute"].items())
    summary["report"] = (
        f"{len(scores)} images: {summary['accuracy']:.1%} of attributes right ({attributes}/{total}; {per}); "
        f"{summary['exact']:.1%} of scenes exactly right ({exact}/{len(scores)}); "
        f"{summary['extra']} extra objects, {summary['missing']} missing"
    )
    return summary


def score_images(pairs: Iterable[tuple[Scene | str, object]]) -> dict:
    """`summarize` of `score` over (caption or scene, image or path) pairs."""
    return summarize([score(expected, image) for expected, image in pairs])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m epdiff.train.checker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("CAPTION", "IMAGE"),
                        help="a caption and the image drawn for it (repeatable)")
    parser.add_argument("--manifest", help="a file of 'CAPTION<TAB>IMAGE' lines (image paths relative to it)")
    parser.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    args = parser.parse_args(argv)
    pairs = [tuple(p) for p in args.pair]
    if args.manifest:
        base = os.path.dirname(os.path.abspath(args.manifest))
        with open(args.manifest) as f:
            for line in f:
                if line.strip():
                    text, path = line.rstrip("\n").split("\t")
                    pairs.append((text, os.path.join(base, path)))
    if not pairs:
        parser.error("give --pair CAPTION IMAGE or --manifest FILE")
    summary = score_images(pairs)
    print(json.dumps(summary, indent=1) if args.json else summary["report"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
