"""The `epdiff` command line: `epdiff layout | generate | make-tiny`."""

from __future__ import annotations

import argparse
import sys

from .config import ALL2ALL_BACKENDS, EXPERT_PLACEMENTS, ConfigError, ParallelConfig


def add_parallel_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("parallelism (world size = PP × DP × CFG × SP × TP)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard attention heads and MLP widths over this many ranks")
    g.add_argument("--sequence-parallel-size", "-sp", type=int, default=1,
                   help="split the image tokens over this many ranks (Ulysses)")
    g.add_argument("--cfg-parallel-size", type=int, default=1,
                   help="2: conditional and unconditional branches on different ranks")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="different prompts on different ranks")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many consecutive stages")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="spread the experts over all TP×SP×CFG×DP ranks of a stage (EP size is computed)")
    g.add_argument("--all2all-backend", default="allgather_reducescatter", choices=ALL2ALL_BACKENDS,
                   help="how tokens reach the ranks holding their experts (default: %(default)s)")
    g.add_argument("--expert-placement", default="linear", choices=EXPERT_PLACEMENTS,
                   help="linear: rank r holds a contiguous block of experts; round_robin: e %% EP")


def parallel_config_from_args(args) -> ParallelConfig:
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size, sequence_parallel_size=args.sequence_parallel_size,
        cfg_parallel_size=args.cfg_parallel_size, data_parallel_size=args.data_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size, enable_expert_parallel=args.enable_expert_parallel,
        all2all_backend=args.all2all_backend, expert_placement=args.expert_placement)


def cmd_layout(args) -> int:
    from .distributed.parallel_state import rank_groups
    from .moe.expert_map import local_experts

    config = parallel_config_from_args(args).validate(world_size=args.world_size, num_experts=args.num_experts)
    print(f"layout: {config.describe()}  world size {config.world_size}")
    groups = rank_groups(config)
    for name, label in [("tp", "tensor parallel"), ("sp", "sequence parallel"), ("cfg", "cfg parallel"),
                        ("dp", "data parallel"), ("pp", "pipeline stages"), ("token", "token groups"),
                        ("ep", "expert parallel" if config.enable_expert_parallel else "stage (EP off)")]:
        lists = groups[name]
        print(f"{label:>17} ({len(lists)} group{'s' * (len(lists) != 1)} of {len(lists[0])}): "
              + " ".join("[" + ",".join(map(str, g)) + "]" for g in lists))
    if config.enable_expert_parallel and args.num_experts:
        print(f"experts per rank: {args.num_experts // config.ep_size} ({config.expert_placement})")
        for r in range(config.ep_size):
            print(f"  ep rank {r}: experts {local_experts(args.num_experts, config.ep_size, r, config.expert_placement)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layout", help="print every parallel group as rank lists, starting no worker")
    add_parallel_args(p)
    p.add_argument("--world-size", type=int, default=None, help="check the layout against this world size")
    p.add_argument("--num-experts", type=int, default=None,
                   help="check divisibility and print the expert placement for this many experts")
    p.set_defaults(func=cmd_layout)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"epdiff: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
