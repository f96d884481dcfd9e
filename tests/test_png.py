"""epdiff's PNG encoder (engine/png.py): Pillow reads back the very pixels and the metadata, and the
file passes its checks (chunk CRCs, one zlib stream made of strips deflated apart)."""

import io

import numpy as np
import pytest
from PIL import Image

from epdiff.engine.png import ROWS_PER_STRIP, encode_png


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 3, 3), (ROWS_PER_STRIP * 3 + 7, 130, 3), (70, 33), (9, 4, 4)])
def test_pillow_reads_back_the_pixels_and_the_metadata(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] = np.sort(pixels[: shape[0] // 2], axis=1)  # smooth rows too
    metadata = {"prompt": "a cat in a hat", "cot_text": "un café, 猫 and ✓", "seed": "3"}
    data = encode_png(pixels, metadata)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    image = Image.open(io.BytesIO(data))
    assert np.array_equal(np.asarray(image), pixels)
    assert {k: image.info[k] for k in metadata} == metadata


def test_a_smooth_image_compresses_about_as_pillow_does():
    y, x = np.mgrid[0:512, 0:512]
    pixels = np.stack([x // 2, y // 2, (x + y) // 4], -1).astype(np.uint8)
    pillow = io.BytesIO()
    Image.fromarray(pixels).save(pillow, format="PNG", compress_level=1)
    assert len(encode_png(pixels)) < 1.5 * len(pillow.getvalue())
