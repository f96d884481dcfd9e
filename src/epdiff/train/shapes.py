"""A captioned synthetic data set: one or two coloured shapes on a white background.

A scene holds one object at any of five positions, or two objects on an opposite pair of sides
(left and right, or top and bottom), the left or top one first. Captions are lowercase English
over a handful of common words, so a word-level tokenizer covers them:

    "a small red circle on the left and a large blue square on the right"

`split_scenes` holds out a fixed set of captions (never seen in training) for judging whether the
model composes attributes it has only seen apart; `checker` reads images back into scenes.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple")
POSITIONS = ("left", "right", "top", "bottom", "centre")
SIZES = ("small", "large")

# Saturated and far apart in hue, so that the checker can tell them apart even when blurred into
# the background (it compares hue directions, see checker.py).
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 200, 20),
    "purple": (150, 40, 190),
}
BACKGROUND = (255, 255, 255)

# The position pairs a two-object scene may use; the first of each pair is drawn and said first.
OPPOSITE_PAIRS = (("left", "right"), ("top", "bottom"))
PREPOSITION = {"left": "on", "right": "on", "top": "at", "bottom": "at", "centre": "in"}

# Shape centres as fractions of the side (x, y). The side positions sit a little inside the centre
# of their third (1/6 = 0.167) so that a large shape fits wholly in the picture: a clipped shape
# would change the fill ratio the checker reads the shape from.
SIDE_ANCHOR = 0.22
CENTRES = {
    "left": (SIDE_ANCHOR, 0.5),
    "right": (1 - SIDE_ANCHOR, 0.5),
    "top": (0.5, SIDE_ANCHOR),
    "bottom": (0.5, 1 - SIDE_ANCHOR),
    "centre": (0.5, 0.5),
}
# Bounding-box side as a fraction of the image side.
EXTENT = {"small": 0.2, "large": 0.4}
# Jitter bounds: small enough that a jittered shape stays in its third and its size class, and two
# large shapes on opposite sides never touch.
POSITION_JITTER = 0.03  # of the side, each axis
SIZE_JITTER = 0.08  # relative

# The held-out split: the captions with the smallest salted SHA-256 are held out, a fixed number
# per object count. Changing the salt or the counts changes the split (and invalidates models).
SPLIT_SALT = "epdiff-shapes-split-v1"
HELDOUT_ONE_OBJECT = 24  # of 150
HELDOUT_TWO_OBJECT = 180  # of 1800


@dataclass(frozen=True)
class ShapeObject:
    """One object; in a caption that leaves them out (a one-object scene's), position and size are
    None: not asked for."""

    shape: str
    colour: str
    position: str | None
    size: str | None

    def __post_init__(self):
        for value, allowed in ((self.shape, SHAPES), (self.colour, COLOURS), (self.position, POSITIONS + (None,)),
                               (self.size, SIZES + (None,))):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]

    def __post_init__(self):
        if len(self.objects) == 2:
            if any(o.position is None or o.size is None for o in self.objects):
                raise ValueError("each object of a two-object scene needs its position and size")
            positions = tuple(o.position for o in self.objects)
            if positions not in OPPOSITE_PAIRS:
                raise ValueError(f"two objects must be placed {' or '.join('/'.join(p) for p in OPPOSITE_PAIRS)}"
                                 f" (left or top first), not {'/'.join(positions)}")
        elif len(self.objects) != 1:
            raise ValueError(f"a scene holds 1 or 2 objects, not {len(self.objects)}")


def object_phrase(obj: ShapeObject) -> str:
    """'a [SIZE] COLOUR SHAPE [on/at/in the POSITION]': what is None is not said."""
    size = f"{obj.size} " if obj.size else ""
    where = f" {PREPOSITION[obj.position]} the {obj.position}" if obj.position else ""
    return f"a {size}{obj.colour} {obj.shape}{where}"


def caption(scene: Scene) -> str:
    return " and ".join(object_phrase(o) for o in scene.objects)


def partial(scene: Scene, say_size: bool, say_position: bool) -> Scene:
    """A one-object scene as a caption that leaves out its size or position (or both) asks for it."""
    (obj,) = scene.objects
    return Scene((ShapeObject(obj.shape, obj.colour, obj.position if say_position else None,
                              obj.size if say_size else None),))


def _parse_phrase(phrase: list[str], text: str) -> ShapeObject:
    expected = f"cannot parse caption {text!r}: expected 'a [SIZE] COLOUR SHAPE [on/at/in the POSITION]'"
    if len(phrase) < 3 or phrase[0] != "a":
        raise ValueError(expected)
    rest = phrase[1:]
    size = rest.pop(0) if rest[0] in SIZES else None
    if len(rest) not in (2, 5):
        raise ValueError(expected)
    colour, shape = rest[:2]
    position = None
    if len(rest) == 5:
        preposition, the, position = rest[2:]
        if the != "the" or PREPOSITION.get(position) != preposition:
            raise ValueError(expected)
    try:
        return ShapeObject(shape, colour, position, size)
    except ValueError as e:
        raise ValueError(f"cannot parse caption {text!r}: {e}") from None


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; the two objects may be given in either order. One object may
    leave out its size or its position (not asked for: None)."""
    words = text.split()
    phrases = [list(group) for is_and, group in itertools.groupby(words, lambda w: w == "and") if not is_and]
    objects = [_parse_phrase(phrase, text) for phrase in phrases]
    if not phrases:
        raise ValueError(f"cannot parse caption {text!r}: no object")
    # "and" must join exactly two phrases: no leading, trailing or doubled "and"
    if words.count("and") != len(phrases) - 1:
        raise ValueError(f"cannot parse caption {text!r}: misplaced 'and'")
    if len(objects) == 2 and any(o.position is None or o.size is None for o in objects):
        raise ValueError(f"cannot parse caption {text!r}: each of two objects needs its size and position")
    objects.sort(key=lambda o: POSITIONS.index(o.position) if o.position else 0)  # left before right, top before bottom
    try:
        return Scene(tuple(objects))
    except ValueError as e:
        raise ValueError(f"cannot parse caption {text!r}: {e}") from None


def all_scenes() -> list[Scene]:
    """Every valid scene, one-object scenes first (150), then two-object scenes (2 x 30 x 30 = 1800)."""
    scenes = [Scene((ShapeObject(shape, colour, position, size),))
              for position, size, colour, shape in itertools.product(POSITIONS, SIZES, COLOURS, SHAPES)]
    for first_position, second_position in OPPOSITE_PAIRS:
        firsts = [ShapeObject(sh, c, first_position, sz) for sz, c, sh in itertools.product(SIZES, COLOURS, SHAPES)]
        seconds = [ShapeObject(sh, c, second_position, sz) for sz, c, sh in itertools.product(SIZES, COLOURS, SHAPES)]
        scenes += [Scene((a, b)) for a, b in itertools.product(firsts, seconds)]
    return scenes


def _split_key(scene: Scene) -> str:
    return hashlib.sha256((SPLIT_SALT + caption(scene)).encode()).hexdigest()


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(train, heldout): a fixed split, 1746 / 204 scenes.

    Held out are the HELDOUT_ONE_OBJECT one-object and HELDOUT_TWO_OBJECT two-object scenes whose
    salted caption hashes are smallest. Train keeps all_scenes() order; heldout is in hash order,
    so any prefix of it is an unbiased sample (one- and two-object scenes mixed).
    """
    scenes = all_scenes()
    heldout = []
    for count, keep in ((1, HELDOUT_ONE_OBJECT), (2, HELDOUT_TWO_OBJECT)):
        heldout += sorted((s for s in scenes if len(s.objects) == count), key=_split_key)[:keep]
    heldout.sort(key=_split_key)
    held = set(heldout)
    return [s for s in scenes if s not in held], heldout


def partial_scenes() -> list[Scene]:
    """Every distinct one-object caption that leaves out the size, the position or both (what a user
    types who says less than the training captions: "a small green triangle"), 15 x 8 = 120, in
    salted-hash order so that any prefix is an unbiased sample of the three kinds."""
    said = {partial(s, say_size, say_position) for s in all_scenes() if len(s.objects) == 1
            for say_size, say_position in ((False, True), (True, False), (False, False))}
    return sorted(said, key=_split_key)


# The prompt sets a model is scored on (`epdiff score --prompts`).
PROMPT_SETS = {
    "heldout": lambda: split_scenes()[1],  # 204 scenes never seen in training
    "partial": partial_scenes,  # 120 one-object captions that leave out size, position or both
}


def render(scene: Scene, size: int = 128, rng: random.Random | None = None) -> Image.Image:
    """The scene drawn on a size x size white RGB image; with `rng`, positions and sizes jitter a little."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy = CENTRES[obj.position]
        extent = EXTENT[obj.size]
        if rng is not None:
            cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            extent *= rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        half = extent * size / 2
        # keep a pixel of margin: a shape cut by the border would read as another shape
        x = min(max(cx * size, half + 1), size - 1 - half)
        y = min(max(cy * size, half + 1), size - 1 - half)
        left, top, right, bottom = round(x - half), round(y - half), round(x + half) - 1, round(y + half) - 1
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=colour)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=colour)
    return image


def sample_scene(rng: random.Random, scenes: list[Scene]) -> Scene:
    return scenes[rng.randrange(len(scenes))]
