"""Triton kernels for the memory-bound steps around the GEMMs (CUDA inference only).

Each kernel reads its inputs once and writes its outputs once where eager PyTorch makes several
passes (fp32 upcasts, temporaries). Callers check `available(x)` and otherwise run the eager
code, which is the reference the GPU tests compare against; CPU, training and installs without
Triton always take the eager path, and EPDIFF_TRITON=0 forces it (to tell a kernel's effect on
an image from other numerical differences).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None


def available(x: torch.Tensor) -> bool:
    """On CUDA with Triton, for inference (the kernels have no backward)."""
    return ENABLED and x.is_cuda and not torch.is_grad_enabled()


ENABLED = triton is not None and os.environ.get("EPDIFF_TRITON", "1") != "0"


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The GPU's multiprocessors (a launch size for kernels that spread over all of them)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count
