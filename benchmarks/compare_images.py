"""PSNR and max level difference of PNGs against a reference PNG.

    python benchmarks/compare_images.py reference.png other.png [more.png ...]
"""

import math
import sys

import numpy as np
from PIL import Image


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(paths):
    ref = np.asarray(Image.open(paths[0]).convert("RGB"))
    for p in paths[1:]:
        img = np.asarray(Image.open(p).convert("RGB"))
        print(f"{p}: PSNR {psnr(ref, img):.2f} dB vs {paths[0]}, max level difference "
              f"{int(np.abs(ref.astype(int) - img.astype(int)).max())}")


if __name__ == "__main__":
    main(sys.argv[1:])
