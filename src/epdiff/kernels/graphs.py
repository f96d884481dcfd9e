"""A step whose shapes never change, replayed as a CUDA graph (its kernel launches are captured once)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class CudaGraphStep:
    """fn(*tensors) with the same shapes and devices on every call and its state in tensors it
    updates in place. On a GPU the first call runs eagerly on a side stream (lazy initialisation,
    Triton compilation, the MoE layers' token counts), the second is captured and every call from
    then on copies its inputs into the captured ones and replays; the returned tensor is the
    graph's own output buffer, overwritten by the next call. Elsewhere (or not enabled) fn runs
    as it is. The graph's memory pool holds one call's intermediate tensors for its life."""

    def __init__(self, fn: Callable[..., torch.Tensor], enabled: bool = True, pool=None):
        """pool: a memory pool shared with other graphs (torch.cuda.graph_pool_handle())."""
        self.fn, self.calls, self.enabled, self.pool = fn, 0, enabled, pool
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
            with torch.cuda.graph(self.graph, pool=self.pool):
                self.output = self.fn(*self.inputs)
        else:
            for buffer, t in zip(self.inputs, inputs):
                buffer.copy_(t)
        self.graph.replay()
        return self.output


class CudaGraphsByShape:
    """fn(*tensors) for inputs of a few recurring shapes: a CudaGraphStep per shape, the `keep` most
    recently used kept. The graphs share one memory pool, so only one call's outputs are valid at
    a time: the caller copies what it keeps before the next call."""

    def __init__(self, fn: Callable, keep: int):
        self.fn, self.keep = fn, keep
        self.steps: OrderedDict[tuple, CudaGraphStep] = OrderedDict()
        self.pool = None

    def __call__(self, *inputs: torch.Tensor):
        if self.pool is None and inputs[0].device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        step = self.steps.pop(key, None) or CudaGraphStep(self.fn, pool=self.pool)
        self.steps[key] = step
        if len(self.steps) > self.keep:
            self.steps.popitem(last=False)
        return step(*inputs)
