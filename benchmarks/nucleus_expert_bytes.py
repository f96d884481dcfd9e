"""Parameter bytes per rank of Nucleus-Image at release size, by EP size (CPU, no weights: the
model is built on the meta device with the groups of rank 0 of each layout).

    python benchmarks/nucleus_expert_bytes.py

EP = DP here (each rank its own images); TP or SP instead of DP would split the attention and
dense weights too, not the experts' bytes per rank.
"""

from __future__ import annotations

import torch

from epdiff.config import ParallelConfig
from epdiff.distributed.parallel_state import GROUP_NAMES, Group, ParallelState, rank_groups
from epdiff.models.nucleus_image.config import NucleusImageConfig
from epdiff.models.nucleus_image.model import NucleusImageTransformer
from epdiff.moe.layer import moe_layers
from epdiff.quantization import get_quantization_config
from nucleus_step import release_config


def rank0_state(config: ParallelConfig) -> ParallelState:
    """Rank 0's groups of the layout, without processes (sizes and positions only)."""
    groups = {name: Group(name, ranks[0], 0, None) for name, ranks in rank_groups(config).items()}
    assert set(groups) == set(GROUP_NAMES)
    return ParallelState(config, groups, 0, torch.device("meta"))


def main():
    fields = release_config(32)
    config = NucleusImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    print("| EP | routed experts per rank | bf16: experts / whole transformer per rank | "
          "--quantization fp8: experts / whole per rank |")
    print("| --- | --- | --- | --- |")
    for ep in (1, 2, 4, 8):
        parallel = ParallelConfig(data_parallel_size=ep, enable_expert_parallel=ep > 1)
        row = [str(ep)]
        state = rank0_state(parallel)
        for quantization in (None, "fp8"):
            model = NucleusImageTransformer(config, state, torch.bfloat16, "meta", get_quantization_config(quantization))
            moe = moe_layers(model)
            expert_bytes = sum(t.numel() * t.element_size() for m in moe for t in
                               list(m.experts.parameters()) + list(m.experts.buffers()))
            total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
            if quantization is None:
                row.append(f"{moe[0].experts.num_local_experts} of {config.num_experts} in each of {len(moe)} layers")
            row.append(f"{expert_bytes / 2 ** 30:.2f} / {total / 2 ** 30:.2f} GiB")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
