"""epdiff: expert-parallel inference for Mixture-of-Experts diffusion transformers."""

from .config import ConfigError, ParallelConfig
from .sampling.step_cache import StepCacheConfig

__version__ = "0.1.0"
_ENGINE = ("Engine", "EngineConfig", "ImageGenerator", "SamplingParams")
__all__ = ["ConfigError", "ParallelConfig", "StepCacheConfig", "__version__", *_ENGINE]


def __getattr__(name):  # the engine pulls in the model: import it only when asked for
    if name in _ENGINE:
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
