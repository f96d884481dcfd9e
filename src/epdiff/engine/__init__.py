"""The engine: one model loaded once on every rank, serving request after request.

`EngineConfig` (what the engine is) and `SamplingParams` (what one request asks) are checked in
`params`; `Engine` drives the workers (`worker`) through the `planner`'s batches, each run by
the denoising loop (`denoise`) around a model family's pipeline; `files` writes outputs;
`ImageGenerator` is the Python API over it.
"""

from .engine import Engine, EngineDeadError, GeneratedImage, ImageFailedError, QueueFullError, RequestOutput
from .generator import ImageGenerator
from .params import EngineConfig, RequestError, SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineDeadError", "GeneratedImage", "ImageFailedError", "ImageGenerator",
           "QueueFullError", "RequestError", "RequestOutput", "SamplingParams"]
