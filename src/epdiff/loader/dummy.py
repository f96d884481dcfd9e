"""`--load-format dummy`: random weights of the real shapes, made on the device, for benchmarks at
full size without a checkpoint (docs/architecture.md, 'Checkpoints')."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import ColumnParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..moe.experts import GroupedExperts


def init_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Normal(0, std) matrices, zero biases, unit norms; this rank's experts only. Layers with a
    quantization method draw their high-precision weights in the model dtype and load them through
    it, so a quantized model holds the quantization of the very values an unquantized one draws
    (one layer at a time), and the two can be compared."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                for kind, shape in module.weight_shapes().items():
                    value = draw(shape, module.dtype)
                    for e in range(shape[0]):
                        module.load_expert(e, kind, value[e])
                    del value
            elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                module.set_weight(draw(module.weight.shape, module.dtype))
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            else:
                is_norm = isinstance(module, (RMSNorm, nn.GroupNorm))
                for name, p in module.named_parameters(recurse=False):
                    if is_norm:
                        p.fill_(1.0 if name == "weight" else 0.0)
                    elif p.dim() == 1:
                        p.zero_()  # biases
                    else:
                        p.normal_(0.0, std, generator=g)
