"""Where a request's outputs go on disk: checked before any compute, written atomically.

A path is checked by creating a file beside it (os.access answers yes to root for paths such as
/sys/x.png that no one can create); every file is written under a temporary name in the same
folder and renamed into place, so a crash never leaves a half-written image.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..config import ConfigError
from .png import encode_png

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def check_writable(path: str, what: str = "output") -> None:
    """Raises ConfigError naming the path when a file cannot be created there."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"cannot write {what} {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"cannot write {what} {path!r}: it is a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".check"):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write {what} {path!r}: {e.strerror or e}") from None


def check_image_path(path: str) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ConfigError(f"image path {path!r} has extension {ext or '(none)'!r}; use one of "
                          f"{', '.join(IMAGE_FORMATS)}")
    check_writable(path, "image")


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(temporary_path) then rename onto path; the temporary file is removed on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to their writer
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def image_path(output: str, prompt_index: int, image_index: int, num_prompts: int, images_per_prompt: int) -> str:
    """With several images, -<prompt>-<image> goes before the extension, zero-padded so that the
    names sort in order."""
    if num_prompts * images_per_prompt == 1:
        return output
    stem, ext = os.path.splitext(output)
    p, i = len(str(num_prompts - 1)), len(str(images_per_prompt - 1))
    return f"{stem}-{prompt_index:0{p}d}-{image_index:0{i}d}{ext}"


def image_metadata(image, params, config) -> dict[str, str]:
    """What regenerates this image alone: its own seed, with the request's prompt, size, steps
    and guidance, and the engine's device kind, dtype and quantization (the noise is drawn on the
    device, and each dtype rounds differently). config: a resolved EngineConfig."""
    return {"prompt": image.prompt, "seed": str(image.seed), "steps": str(params.num_inference_steps),
            "guidance_scale": str(params.guidance_scale), "width": str(params.width), "height": str(params.height),
            "device": config.device, "dtype": config.dtype, "quantization": config.quantization or "none",
            "parallel_layout": config.parallel.describe(), "model": os.path.basename(os.path.normpath(config.model)),
            "cache": params.cache.describe(), "full_steps": str(image.full_steps), "solver": params.solver,
            "system_prompt": params.system_prompt or "", "task": params.task or "image",
            **({"cot_text": params.cot_text} if params.cot_text is not None else {}),
            "software": "epdiff"}


def pil_image(pixels, metadata: dict[str, str]) -> Image.Image:
    """A PIL image that carries its metadata wherever it is saved: PNG as text chunks, JPEG as a
    JSON comment, WebP none (Pillow's `encoderinfo`: what `save` adds to its own parameters).
    `info` holds the metadata too, for reading."""
    image = Image.fromarray(pixels)
    image.info.update(metadata)
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    image.encoderinfo = {"pnginfo": info, "comment": json.dumps(metadata).encode()}
    return image


def write_image(target, fmt: str, pixels, metadata: dict[str, str]) -> None:
    """Encodes pixels as fmt (PNG, JPEG or WEBP) into target (a path or a binary file), with the
    metadata (pil_image)."""
    if fmt == "PNG":  # on several cores: it is on every image's latency, the server's included
        data = encode_png(pixels, metadata)
        if isinstance(target, (str, os.PathLike)):
            with open(target, "wb") as f:
                f.write(data)
        else:
            target.write(data)
        return
    image = pil_image(pixels, metadata)
    if fmt == "JPEG":
        image.save(target, format="JPEG", quality=95)
    else:
        image.save(target, format=fmt)


def save_image(path: str, pixels, metadata: dict[str, str]) -> None:
    fmt = IMAGE_FORMATS[os.path.splitext(path)[1].lower()]
    write_atomically(path, lambda tmp: write_image(tmp, fmt, pixels, metadata))


def save_json(path: str, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomically(path, write)
