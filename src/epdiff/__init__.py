"""epdiff: expert-parallel inference for Mixture-of-Experts diffusion transformers."""

from .config import ConfigError, ParallelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ImageGenerator", "ParallelConfig", "__version__"]


def __getattr__(name):  # the engine pulls in the model: import it only when asked for
    if name == "ImageGenerator":
        from .engine import ImageGenerator
        return ImageGenerator
    raise AttributeError(name)
