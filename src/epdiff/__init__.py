"""epdiff: expert-parallel inference for Mixture-of-Experts diffusion transformers."""

from .config import ConfigError, ParallelConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "ParallelConfig", "__version__"]
