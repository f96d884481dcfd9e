"""A 1024² RGB image encoded as PNG: Pillow at zlib level 1 (what epdiff used) against epdiff's
encoder (engine/png.py: "Up"-filtered rows, strips deflated on threads), in one run.

    python benchmarks/png_encode.py --size 1024

Two images: uniform noise (what dummy weights draw: zlib's worst case) and a smooth gradient with
grain (closer to a photograph). Median of --runs encodes each; file sizes beside.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time

import numpy as np
from PIL import Image

from epdiff.engine.png import THREADS, encode_png


def pillow(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def median_seconds(fn, runs: int):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n = args.size
    y, x = np.mgrid[0:n, 0:n]
    smooth = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], -1)
    images = {"noise": rng.integers(0, 256, (n, n, 3), dtype=np.uint8),
              "smooth + grain": np.clip(smooth + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)}
    print(f"{os.cpu_count()} CPUs, {THREADS} encoder threads")
    for name, pixels in images.items():
        encode_png(pixels)  # the thread pool started
        (a, a_bytes), (b, b_bytes) = median_seconds(lambda: pillow(pixels), args.runs), \
            median_seconds(lambda: encode_png(pixels), args.runs)
        print(json.dumps(dict(image=name, size=n, pillow_s=a, pillow_kib=a_bytes // 1024, epdiff_s=b,
                              epdiff_kib=b_bytes // 1024, speedup=a / b)))


if __name__ == "__main__":
    main()
