"""A step whose shapes never change, replayed as a CUDA graph (its kernel launches are captured once)."""

from __future__ import annotations

from typing import Callable

import torch


class CudaGraphStep:
    """fn(*tensors) with the same shapes and devices on every call and its state in tensors it
    updates in place. On a GPU the first call runs eagerly on a side stream (lazy initialisation,
    Triton compilation, the MoE layers' token counts), the second is captured and every call from
    then on copies its inputs into the captured ones and replays; the returned tensor is the
    graph's own output buffer, overwritten by the next call. Elsewhere (or not enabled) fn runs
    as it is. The graph's memory pool holds one call's intermediate tensors for its life."""

    def __init__(self, fn: Callable[..., torch.Tensor], enabled: bool = True):
        self.fn, self.calls, self.enabled = fn, 0, enabled
        self.graph = self.inputs = self.output = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if not self.enabled or not inputs or inputs[0].device.type != "cuda":
            return self.fn(*inputs)
        if self.calls == 1:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.inputs = [t.clone() for t in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = self.fn(*self.inputs)
        else:
            for buffer, t in zip(self.inputs, inputs):
                buffer.copy_(t)
        self.graph.replay()
        return self.output
