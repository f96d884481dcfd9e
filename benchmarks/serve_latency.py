"""Images through a running `epdiff serve` against one `epdiff generate` command per image.

    python benchmarks/serve_latency.py --images 10 --steps 10 -- -dp 2 --enable-expert-parallel   # CPU
    python benchmarks/serve_latency.py --release-width 8 --images 10 --steps 20 --size 1024       # one GPU

Everything after `--` is engine flags, given to both. First one server: a warm-up request, then
--images requests at each --concurrency (distinct prompts and seeds); then --images commands of
`epdiff generate` one after another, each starting its workers and loading the model (stopped
early past --cli-budget-s). Per run: latency p50/p95 (client side: the whole HTTP round trip for
the server, the whole command for the CLI) and images per second; for each request also its
latency over its own denoise-and-decode time (the response's inference_time_s), which the
target keeps at or below 1.1 at concurrency 1. --release-width N: HunyuanImage-3.0 at release
width cut to N layers, dummy weights. Writes serve_latency.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from epdiff.distributed.launch import free_port

PROMPTS = ["a small red circle on the left", "a large blue square at the top", "a small green triangle on the right",
           "a large yellow circle at the bottom", "a small purple square in the centre"]
EPDIFF = [sys.executable, "-m", "epdiff.cli"]


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(latencies: list[float], wall: float) -> dict:
    return dict(p50_s=percentile(latencies, 0.5), p95_s=percentile(latencies, 0.95),
                images_per_s=len(latencies) / wall, wall_s=wall)


def request_body(i: int, args) -> dict:
    body = {"prompt": PROMPTS[i % len(PROMPTS)] + f" number {i}", "seed": i, "num_inference_steps": args.steps}
    if args.size:
        body["size"] = f"{args.size}x{args.size}"
    return body


def server_timing(headers) -> dict[str, float]:
    """The answer's Server-Timing phases, in milliseconds."""
    phases = {}
    for entry in headers.get("server-timing", "").split(","):
        name, _, duration = entry.strip().partition(";dur=")
        if duration:
            phases[name] = float(duration)
    return phases


def run_cli(args, engine_flags: list[str], folder: str) -> dict:
    latencies = []
    start = time.perf_counter()
    for i in range(args.images):
        if args.cli_budget_s is not None and i and time.perf_counter() - start > args.cli_budget_s:
            print(f"  --cli-budget-s {args.cli_budget_s:g} spent: {i} of {args.images} commands ran", flush=True)
            break
        body = request_body(i, args)
        size = ["--height", str(args.size), "--width", str(args.size)] if args.size else []
        t = time.perf_counter()
        subprocess.run([*EPDIFF, "generate", "--prompt", body["prompt"], "--seed", str(i), "--num-inference-steps",
                        str(args.steps), *size, "--no-progress", "--output", os.path.join(folder, f"cli{i}.png"),
                        *engine_flags], check=True, stdout=subprocess.DEVNULL)
        latencies.append(time.perf_counter() - t)
        print(f"  cli {i}: {latencies[-1]:.2f} s", flush=True)
    return summary(latencies, time.perf_counter() - start) | dict(latencies_s=latencies)


def run_server(args, engine_flags: list[str], folder: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(folder, "server.log"), "wb")
    start = time.perf_counter()
    server = subprocess.Popen([*EPDIFF, "serve", "--port", str(port), "--max-queue", "1000", *engine_flags],
                              stdout=log, stderr=subprocess.STDOUT)
    results = {}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"the server exited with {server.returncode}; see {log.name}")
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            results["healthy_after_s"] = time.perf_counter() - start
            warm = client.post("/v1/images/generations", json=request_body(10_000, args))
            warm.raise_for_status()

            def one(i: int) -> dict:
                t = time.perf_counter()
                with client.stream("POST", "/v1/images/generations", json=request_body(i, args)) as response:
                    headers_s = time.perf_counter() - t
                    response.read()
                latency = time.perf_counter() - t
                response.raise_for_status()
                body = response.json()
                return dict(latency_s=latency, headers_s=headers_s, inference_s=body["inference_time_s"],
                            queue_s=body["queue_time_s"], server_ms=server_timing(response.headers))

            for concurrency in args.concurrency:
                t = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    runs = list(pool.map(one, range(args.images)))
                wall = time.perf_counter() - t
                row = summary([r["latency_s"] for r in runs], wall)
                ratios = [r["latency_s"] / r["inference_s"] for r in runs]
                phases = {name: statistics.median(r["server_ms"].get(name, 0.0) for r in runs)
                          for name in runs[0]["server_ms"]}
                phases["body"] = statistics.median((r["latency_s"] - r["headers_s"]) * 1e3 for r in runs)
                phases["outside"] = statistics.median((r["headers_s"] * 1e3 - r["server_ms"].get("total", 0.0))
                                                      for r in runs)
                row |= dict(latency_over_inference_median=statistics.median(ratios),
                            latency_over_inference_max=max(ratios),
                            inference_p50_s=percentile([r["inference_s"] for r in runs], 0.5),
                            median_ms=phases, requests=runs)
                results[f"concurrency_{concurrency}"] = row
                print(f"  server, concurrency {concurrency}: p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, "
                      f"{row['images_per_s']:.2f} images/s, latency / own inference: median "
                      f"{row['latency_over_inference_median']:.3f}, max {row['latency_over_inference_max']:.3f}",
                      flush=True)
                print("    median ms: " + ", ".join(f"{name} {ms:.1f}" for name, ms in phases.items()), flush=True)
    finally:
        server.terminate()
        results["exit_code"] = server.wait(120)
        log.close()
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=None, help="square side (default: the model's base size)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--release-width", type=int, default=None, metavar="LAYERS",
                   help="HunyuanImage-3.0 at release width with this many layers, dummy weights")
    p.add_argument("--variant", default="base", choices=("base", "instruct", "instruct-distil"),
                   help="with --release-width: which HunyuanImage-3.0 checkpoint's configs")
    p.add_argument("--skip-cli", action="store_true")
    p.add_argument("--cli-budget-s", type=float, default=None,
                   help="start no further `epdiff generate` command once this many seconds are spent")
    p.add_argument("--out", default=".")
    args, engine_flags = p.parse_known_args()
    engine_flags = [f for f in engine_flags if f != "--"]
    if args.release_width:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from step_scaling import release_width_model

        engine_flags += ["--model", release_width_model(args.release_width, args.variant), "--load-format", "dummy"]
    os.makedirs(args.out, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="serve_latency.")
    report = dict(images=args.images, steps=args.steps, size=args.size, engine_flags=engine_flags)
    path = os.path.join(args.out, "serve_latency.json")
    print("epdiff serve:", flush=True)
    report["server"] = run_server(args, engine_flags, folder)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    if not args.skip_cli:
        print(f"epdiff generate, {args.images} commands one after another:", flush=True)
        report["cli"] = run_cli(args, engine_flags, folder)
        print(f"  p50 {report['cli']['p50_s']:.2f} s, p95 {report['cli']['p95_s']:.2f} s, "
              f"{report['cli']['images_per_s']:.3f} images/s", flush=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print("| run | concurrency | latency p50 (s) | latency p95 (s) | images/s | latency / own denoise+decode |")
    print("| --- | --- | --- | --- | --- | --- |")
    if "cli" in report:
        c = report["cli"]
        print(f"| `epdiff generate` per image ({len(c['latencies_s'])} commands) | 1 | {c['p50_s']:.2f} | "
              f"{c['p95_s']:.2f} | {c['images_per_s']:.3f} | |")
    for concurrency in args.concurrency:
        r = report["server"][f"concurrency_{concurrency}"]
        print(f"| `epdiff serve` | {concurrency} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['images_per_s']:.3f} | "
              f"median {r['latency_over_inference_median']:.3f}, max {r['latency_over_inference_max']:.3f} |")
    print(f"server healthy after {report['server']['healthy_after_s']:.1f} s, exit code "
          f"{report['server']['exit_code']}")


if __name__ == "__main__":
    main()
