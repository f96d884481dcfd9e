"""The `epdiff` command line: `epdiff layout | generate | serve | quantize | make-tiny | train-tiny | score`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .config import ConfigError, ParallelConfig


def _flag_type(annotation) -> type | None:
    """int, float or str from a field's annotation ("int", "str | None", ...); None for bool."""
    kinds = [k.strip() for k in str(annotation).split("|") if k.strip() != "None"]
    return None if kinds == ["bool"] else {"int": int, "float": float, "str": str}[kinds[0]]


def add_dataclass_args(p, cls, *, skip: tuple[str, ...] = ()):
    """One flag per field of a config dataclass: `--field-name`, with the field's `option`
    metadata for help, short flag and choices (a bool field is a switch)."""
    add_field_args(p, [f for f in dataclasses.fields(cls) if f.name not in skip])


def dataclass_from_args(cls, args, **given):
    """The inverse of add_dataclass_args: an instance of cls from the parsed flags (and `given`)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in given}, **given)


def add_field_args(p, fields, *, defaults: bool = True):
    """add_dataclass_args for these fields; defaults=False: an absent flag is None, so the caller
    knows which were given."""
    for f in fields:
        names = [f"--{f.name.replace('_', '-')}"] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        help_text = f.metadata.get("help", "")
        kind = _flag_type(f.type)
        default = f.default if defaults else None
        if kind is None:
            p.add_argument(*names, action="store_true", default=default, help=help_text)
            continue
        if defaults and f.default is not None:
            help_text += " (default: %(default)s)"
        p.add_argument(*names, type=kind, default=default, choices=f.metadata.get("choices"), help=help_text)


def add_parallel_args(p: argparse.ArgumentParser):
    add_dataclass_args(p.add_argument_group("parallelism (world size = PP × DP × CFG × SP × TP)"), ParallelConfig)


def parallel_config_from_args(args) -> ParallelConfig:
    return dataclass_from_args(ParallelConfig, args)


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


def add_engine_args(p: argparse.ArgumentParser):
    """What the engine is, fixed for its life: shared by generate, score and serve."""
    from .engine import EngineConfig

    add_dataclass_args(p, EngineConfig, skip=("parallel",))
    add_parallel_args(p)


def engine_config_from_args(args):
    from .engine import EngineConfig

    return dataclass_from_args(EngineConfig, args, parallel=parallel_config_from_args(args))


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file) as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file!r}: {getattr(e, 'strerror', None) or e}") from None
    if not prompts and args.prompt_file:
        raise ConfigError(f"--prompt-file {args.prompt_file!r} has no prompt (every line is blank)")
    if not prompts:
        raise ConfigError("give a prompt: --prompt TEXT or --prompt-file FILE")
    return prompts


def cmd_generate(args) -> int:
    """Checks every input and output, starts the engine once, writes each prompt's images as soon
    as they are done; latents and metrics are written at the end, also when an image failed."""
    from safetensors.torch import save_file

    from .distributed.launch import is_rank_zero
    from .engine import Engine, ImageFailedError
    from .engine.files import check_image_path, check_writable, image_path, save_image, save_json, write_atomically
    from .engine.params import prompt_requests

    config = engine_config_from_args(args).resolve()
    prompts = read_prompts(args)
    output = None if args.latents_only else args.output
    if is_rank_zero():  # rank 0 writes every output, on its node
        if output:
            check_image_path(output)
        for path, what in ((args.save_latents, "--save-latents"), (args.metrics_json, "--metrics-json")):
            if path:
                check_writable(path, what)
    requests = prompt_requests(config, prompts, height=args.height, width=args.width,
                               num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                               seed=args.seed, num_images_per_prompt=args.num_images_per_prompt, solver=args.solver,
                               system_prompt=args.system_prompt, images=args.image, task=args.task,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p)
    first = requests[0]
    snapped = first.height is not None and (args.height or args.width) and (args.height, args.width) != (
        first.height, first.width)
    with Engine(config, decode=output is not None, show_progress=not args.no_progress) as engine:
        if not engine.is_driver:  # torchrun, rank > 0: it has served rank 0 until the end
            return 0
        if snapped:
            asked = f"{args.height or first.height}x{args.width or first.width}"
            print(f"epdiff: size {asked} (HxW) is made at the model's nearest size, {first.height}x{first.width}",
                  flush=True)
        futures = engine.submit_all(requests)
        total, latents, failures, full_steps = len(prompts) * args.num_images_per_prompt, {}, [], []
        size = f"{first.height}x{first.width}"
        layout = config.parallel.describe()
        for i, future in enumerate(futures):
            try:
                out = future.result()
            except ImageFailedError as e:
                failures.append(f"prompt {i}: {e}")
                continue
            if out.cot_text is not None and out.params.task != "image":
                print(f"  prompt {i} wrote, then drew at {out.params.height}x{out.params.width}: {out.cot_text}",
                      flush=True)
            size = f"{out.params.height}x{out.params.width}"
            for image in out.images:
                full_steps.append(image.full_steps)
                if args.save_latents:
                    latents[f"prompt{i}_image{image.index}"] = image.latents.contiguous()
                if output:
                    path = image_path(output, i, image.index, len(prompts), args.num_images_per_prompt)
                    try:
                        save_image(path, image.pixels, image.metadata)
                        print(f"  wrote {path}", flush=True)  # as it is written: a prompt file may be long
                    except OSError as e:
                        failures.append(f"cannot write image {path!r}: {e.strerror or e}")
        routing = engine.routing_stats() if args.routing_stats else []
        metrics = engine.rank_metrics
    if args.save_latents and latents:
        write_atomically(args.save_latents, lambda tmp: save_file(latents, tmp, metadata={
            "seed": str(args.seed), "layout": layout}))
    if args.metrics_json:
        save_json(args.metrics_json, metrics)
    print(f"epdiff: {total - len(failures)} of {total} image(s), {size}, "
          f"{first.num_inference_steps} steps, {layout}")
    if first.cache.enabled and full_steps:
        print(f"  cache {first.cache.describe()}: {min(full_steps)} to {max(full_steps)} of "
              f"{first.num_inference_steps} steps ran the whole model")
    steps = [s for m in metrics for s in m["step_seconds"][1:]] or [s for m in metrics for s in m["step_seconds"]]
    if steps:
        print(f"  {sum(steps) / len(steps):.3f} s per step (mean over ranks, each rank's first step excluded)")
    for stage in routing:
        print(f"routing statistics, pipeline stage {stage['stage']} (layers {stage['layers'][0]}-{stage['layers'][-1]}):")
        print(stage["summary"])
    for failure in failures:
        print(f"epdiff: error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def cmd_serve(args) -> int:
    """The engine behind an OpenAI-style HTTP API and a web page, until SIGTERM or a dead worker."""
    from .distributed.launch import is_rank_zero

    config = engine_config_from_args(args)
    if not is_rank_zero():  # torchrun: serve rank 0's engine until it closes
        from .engine import Engine

        Engine(config)
        return 0
    from .serve.config import ServerConfig
    from .serve.server import run_server

    return run_server(config, dataclass_from_args(ServerConfig, args))


def family_tools() -> dict[str, dict]:
    """Every registered family's tools, by command: {command: {family name: FamilyTool}}."""
    from .models.registry import family_names, get_family

    tools: dict[str, dict] = {}
    for name in family_names():
        for command, tool in get_family(name).tools.items():
            tools.setdefault(command, {})[name] = tool
    return tools


def cmd_family_tool(args) -> int:
    """A family's tool: its options are the flags given (the others keep the options' defaults)."""
    tool = args.tools.get(args.family)
    if tool is None:
        raise ConfigError(f"the {args.family} family has no {args.command} command; "
                          f"families with one: {', '.join(args.tools)}")
    fields = {f.name for f in dataclasses.fields(tool.options)}
    given = {name: value for name, value in vars(args).items() if name in args.tool_flags and value is not None}
    foreign = sorted(set(given) - fields)
    if foreign:
        raise ConfigError(f"--{foreign[0].replace('_', '-')} is not an option of the {args.family} family's "
                          f"{args.command}")
    print(tool.run(args.out_dir, tool.options(**given)))
    return 0


def cmd_score(args) -> int:
    """Generate the held-out prompts with each seed and check each image; one report per
    (steps, guidance) combination asked for."""
    from .engine import ImageGenerator
    from .engine.files import save_json
    from .train.score import score_prompts

    results = []
    with ImageGenerator.from_config(engine_config_from_args(args)) as generator:
        for steps in args.num_inference_steps or [None]:
            for guidance in args.guidance_scale or [None]:
                summary = score_prompts(generator, args.num_prompts, steps, guidance, args.seed, args.prompts)
                if summary is None:  # not the driving rank
                    return 0
                print(f"{args.prompts} prompts, {summary['num_inference_steps']} steps, guidance {summary['guidance_scale']:g}, "
                      f"seeds {' '.join(map(str, args.seed))}: {summary['report']}")
                for seed, per_seed in summary["per_seed"].items():
                    print(f"  seed {seed}: {per_seed['report']}")
                for stage, idle in summary["idle_experts"].items():
                    print(f"  routing, stage {stage}: {idle} (layer, expert) pairs received no token")
                results.append(summary)
                if args.json:  # after each combination, so that a run stopped early keeps what it scored
                    save_json(args.json, results)
    return 0


def cmd_quantize(args) -> int:
    """Write a pre-quantized copy of a checkpoint (its family's quantized tensors + their scales)."""
    from .models.registry import family_for_folder

    summary = family_for_folder(args.model).quantize(args.model, args.out_dir, args.quantization, args.device)
    print(f"wrote {summary['out_dir']}: {summary['quantized_tensors']} expert tensors in {args.quantization}, "
          f"{human_bytes(summary['bytes_in'])} -> {human_bytes(summary['bytes_out'])}")
    return 0


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("layout", help="print every parallel group as rank lists, starting no worker")
    add_parallel_args(p)
    p.add_argument("--world-size", type=int, default=None, help="check the layout against this world size")
    p.add_argument("--num-experts", type=int, default=None,
                   help="check divisibility and print the expert placement for this many experts")
    p.set_defaults(func=cmd_layout)

    p = sub.add_parser("generate", help="text to image",
                       description="Generate images from text prompts on one or many ranks.")
    p.add_argument("--prompt", action="append", help="the prompt (repeat for several)")
    p.add_argument("--prompt-file", help="a file with one prompt a line, spread over the data-parallel ranks")
    p.add_argument("--output", "-o", default="out.png",
                   help="image path (.png carries the metadata; .jpg, .webp); with several images, "
                        "-<prompt>-<image> is added before the extension (default: %(default)s)")
    p.add_argument("--height", type=int, default=None,
                   help="default: the model's; HunyuanImage-3.0 snaps a size to the nearest of its 33 buckets, "
                        "Nucleus-Image takes multiples of 16")
    p.add_argument("--width", type=int, default=None,
                   help="default: the model's; HunyuanImage-3.0 snaps a size to the nearest of its 33 buckets, "
                        "Nucleus-Image takes multiples of 16")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: generation_config.json")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance; <= 1 runs the conditional branch only (default: generation_config.json)")
    p.add_argument("--solver", default=None, help="euler, heun-2, midpoint-2 or kutta-4 (the model family's; "
                                                  "default: the model's first, euler)")
    p.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="edit: an input image (repeat for several; Instruct models); the output size defaults to "
                        "the first image's aspect bucket")
    p.add_argument("--system-prompt", default=None,
                   help="Instruct models: a name (None, en_vanilla, en_recaption, en_think_recaption, en_unified, "
                        "dynamic) or the text itself (default: generation_config.json use_system_prompt)")
    p.add_argument("--task", default=None,
                   help="Instruct models: what the model writes before it draws: image (nothing), think, recaption "
                        "or think_recaption; without --height/--width it also chooses the size (default: "
                        "generation_config.json bot_task)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="the text pass's budget (default: 2048)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the text pass's sampling, 0: greedy (default: generation_config.json)")
    p.add_argument("--top-k", type=int, default=None, help="the text pass's sampling, 0: off (default: "
                                                           "generation_config.json)")
    p.add_argument("--top-p", type=float, default=None, help="the text pass's sampling (default: generation_config.json)")
    p.add_argument("--seed", type=int, default=0,
                   help="image k of prompt i uses seed + i·N + k (N images per prompt); each PNG records its own "
                        "seed (default: %(default)s)")
    p.add_argument("--num-images-per-prompt", "-n", type=int, default=1,
                   help="images per prompt, spread over the data-parallel groups (default: %(default)s)")
    p.add_argument("--save-latents", help="write the final latents as safetensors at the end (for comparisons; "
                                          "held in memory until then: 0.5 MB an image at 1024²)")
    p.add_argument("--metrics-json", help="write per-rank metrics: experts, bytes, memory, times")
    p.add_argument("--routing-stats", action="store_true", help="print per-layer routing statistics")
    p.add_argument("--latents-only", action="store_true",
                   help="skip the VAE decode and image output (use with --save-latents, or for timing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-style image API and a web page over one persistent engine",
                       description="Load the model once and answer POST /v1/images/generations, GET /v1/models, "
                                   "/health, /metrics, and a web page at /.")
    from .serve.config import ServerConfig

    add_dataclass_args(p.add_argument_group("the server"), ServerConfig)
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    from .quantization import QUANTIZATION_METHODS

    for command, tools in family_tools().items():
        p = sub.add_parser(command, help=next(iter(tools.values())).help,
                           description=f"{command}, for the families {', '.join(tools)}; each flag is an option "
                                       "of the family's (absent: its default).")
        p.add_argument("out_dir")
        p.add_argument("--family", default=next(iter(tools)), choices=list(tools),
                       help="the model family (default: %(default)s)")
        flags = set()
        for tool in tools.values():  # families share a flag where their options share a name
            new = [f for f in dataclasses.fields(tool.options) if f.name not in flags]
            flags.update(f.name for f in new)
            add_field_args(p, new, defaults=False)
        p.set_defaults(func=cmd_family_tool, tools=tools, tool_flags=flags)

    from .train.shapes import PROMPT_SETS

    p = sub.add_parser("score", help="draw shape prompts and check each image")
    p.add_argument("--prompts", choices=list(PROMPT_SETS), default="heldout",
                   help="heldout: 204 scenes never seen in training; partial: the 120 one-object captions "
                        "that leave out size, position or both (default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=40, help="the first N prompts of the set")
    p.add_argument("--num-inference-steps", type=int, nargs="+", default=None,
                   help="default: the model's; several: one report each")
    p.add_argument("--guidance-scale", type=float, nargs="+", default=None,
                   help="default: the model's; several: one report each")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2],
                   help="one request per seed (prompt i uses seed + i); the report counts them all")
    p.add_argument("--json", default=None, help="write the summaries, with every image's reading, here")
    add_engine_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("quantize", help="write a pre-quantized copy of a checkpoint (FP8 routed experts)",
                       description="Quantize a bf16 checkpoint's routed experts to float8_e4m3fn with one scale "
                                   "per output channel; the copy loads directly (generate --model OUT_DIR).")
    p.add_argument("model", help="the bf16 model folder")
    p.add_argument("out_dir", help="new folder for the quantized copy (must not exist or be empty)")
    p.add_argument("--quantization", required=True, choices=tuple(QUANTIZATION_METHODS), help="the method (vLLM's name)")
    p.add_argument("--device", default="cpu", help="where the quantization arithmetic runs (e.g. cuda)")
    p.set_defaults(func=cmd_quantize)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed.launch import WorkerError, under_torchrun
    from .engine import EngineDeadError
    from .loader.safetensors_loader import CheckpointError

    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, ValueError, OSError, WorkerError, EngineDeadError) as e:
        # Every expected failure is one line; a worker's error is its rank line and its error line.
        what = f"{e.strerror}: {e.filename!r}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"epdiff: error: {what}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("epdiff: interrupted; all workers stopped", file=sys.stderr)
        code = 130
    if under_torchrun():
        # The images are written: leave without interpreter finalization, where gloo's threads
        # occasionally abort the process (SIGABRT), which torchrun would report as a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
