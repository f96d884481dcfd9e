"""PNG encoding on several cores, for the image at the end of every request's latency.

Pillow's encoder filters each row adaptively and deflates on one core: a 1024² RGB image took
0.17–0.25 s on the GPU machine's CPU, a sixth of an 8-step image (BENCHMARKS §18, §22). Here the
rows are filtered with PNG's "Up" filter in numpy (each row minus the one above, what Pillow's
heuristic picks for most rows of a smooth image), cut into horizontal strips that threads deflate
at zlib level 1 (zlib releases the GIL), each strip but the last ended with a full flush, so that
the parts join into one zlib stream (as pigz does). Metadata go in tEXt chunks, or iTXt (UTF-8)
where a value is not Latin-1, as Pillow writes them; any PNG reader reads the file.
"""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
UP_FILTER = 2
ROWS_PER_STRIP = 64  # below this a strip's thread costs more than it saves
THREADS = min(8, os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="epdiff-png")
    return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has the pool object but none of its threads


os.register_at_fork(after_in_child=_forget_pool)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # keyword, no compression, no language, no translated keyword, UTF-8 text
        return _chunk(b"iTXt", key.encode("latin-1", "replace") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _deflate(data, last: bool) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)  # raw deflate: the zlib header is written once
    return compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_FULL_FLUSH)


def encode_png(pixels: np.ndarray, metadata: dict[str, str] | None = None) -> bytes:
    """uint8 pixels [H, W, 3] (RGB) or [H, W] (grey) -> the bytes of a PNG file with the metadata
    as text chunks."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    flat = pixels.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = UP_FILTER
    rows[0, 1:] = flat[0]  # the row above the first is zeros
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # modulo 256, as the filter is defined
    strips = max(1, min(THREADS, height // ROWS_PER_STRIP))
    bounds = np.linspace(0, height, strips + 1).astype(int)
    parts = [rows[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]  # contiguous views: zlib reads them as they are
    deflated = _threads().map(_deflate, parts, [k == strips - 1 for k in range(strips)])
    stream = b"\x78\x01" + b"".join(deflated) + struct.pack(">I", zlib.adler32(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    text = b"".join(_text_chunk(key, value) for key, value in (metadata or {}).items())
    return SIGNATURE + _chunk(b"IHDR", header) + text + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
