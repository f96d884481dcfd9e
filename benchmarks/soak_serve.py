"""A bounded soak of `epdiff serve` on loopback: mixed valid, invalid and abandoned requests from
many clients at once, for a fixed time, against the built-in model on CPU (DP2 + EP).

    python benchmarks/soak_serve.py --seconds 300 --concurrency 16 --out benchmarks/results

Valid requests draw from a small pool of (prompt, seed, steps), whose images are made once, one at
a time, before the soak: every valid answer must equal its reference within one level per pixel
(images regenerate from their seed in any batch). Invalid requests expect their 4xx; abandoned
ones ask for many steps and leave after a fraction of a second. At the end the server's
`/metrics` request counts must equal what the clients saw (an abandoned request counts as 499 or,
past --request-timeout, 504), nothing may be left unfinished, and the resident memory of the server
and of each worker may not grow by more than --memory-bound-mib from just after the references.
Exit status 1 when any of that fails.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import random
import sys
import threading
import time

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from serve_helpers import ServerProcess  # noqa: E402

GENERATE = "/v1/images/generations"
POOL = [("a small red circle on the left", 11, 3), ("a large blue square at the top", 12, 2),
        ("a small green triangle on the right", 13, 3), ("a large yellow circle at the bottom", 14, 2),
        ("a small purple square in the centre", 15, 3), ("a large red triangle on the left", 16, 2)]
JSON = {"Content-Type": "application/json"}
# (what is wrong, how it is sent, the status it must get)
INVALID = [
    ("steps 0", dict(json={"prompt": "x", "num_inference_steps": 0}), 400),
    ("steps over the limit", dict(json={"prompt": "x", "num_inference_steps": 100_000}), 400),
    ("size", dict(json={"prompt": "x", "size": "99999x99999"}), 400),
    ("n over the limit", dict(json={"prompt": "x", "n": 50}), 400),
    ("unknown field", dict(json={"prompt": "x", "steps": 3}), 400),
    ("no prompt", dict(json={"n": 1}), 400),
    ("prompt not text", dict(json={"prompt": 42}), 400),
    ("lone surrogate", dict(content=b'{"prompt": "a \\ud800 b"}', headers=JSON), 400),
    ("not JSON", dict(content=b"{prompt: x}", headers=JSON), 400),
    ("nested", dict(content=b"[" * 20_000 + b"]" * 20_000, headers=JSON), 400),
    ("text/plain", dict(content=b'{"prompt": "x"}', headers={"Content-Type": "text/plain"}), 415),
    ("body too large", dict(content=b'{"prompt": "' + b"x" * 2_000_000 + b'"}', headers=JSON), 413),
    ("guidance", dict(json={"prompt": "x", "guidance_scale": 1e300}), 400),
]


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))).astype(int)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def metric_counts(client) -> dict[str, float]:
    """Requests finished per status, and "unfinished", from the server's /metrics."""
    counts = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "epdiff_requests_total":
                counts[sample.labels["status"]] = sample.value
            elif sample.name == "epdiff_requests_unfinished":
                counts["unfinished"] = sample.value
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--memory-bound-mib", type=float, default=64.0)
    p.add_argument("--request-timeout", type=float, default=20.0, help="the server's --request-timeout")
    p.add_argument("--out", default=None, help="folder for soak_serve.json and the server's log")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    server = ServerProcess(["-dp", "2", "--enable-expert-parallel", "--max-queue", "64", "--request-timeout",
                            str(args.request_timeout)], os.path.join(args.out or ".", "soak_serve.log"))
    url = server.url
    client = httpx.Client(base_url=url, timeout=120)
    try:
        server.wait_healthy()
        references = {}
        for prompt, seed, steps in POOL:  # one at a time: each image alone in its batch
            body = client.post(GENERATE, json={"prompt": prompt, "seed": seed, "num_inference_steps": steps}).json()
            references[(prompt, seed, steps)] = pixels(body["data"][0])
        processes = [server.pid] + server.children()
        memory_before = {pid: rss_mib(pid) for pid in processes}
        sent = collections.Counter()  # what each answer's status was, as the clients saw it
        wrong = []
        lock = threading.Lock()
        stop = time.time() + args.seconds

        def worker(index: int):
            rng = random.Random(args.seed * 1000 + index)
            with httpx.Client(base_url=url, timeout=120) as c:
                while time.time() < stop:
                    roll = rng.random()
                    try:
                        if roll < 0.6:
                            prompt, seed, steps = rng.choice(POOL)
                            r = c.post(GENERATE, json={"prompt": prompt, "seed": seed, "num_inference_steps": steps})
                            status = r.status_code
                            if status == 200:
                                body = r.json()
                                diff = np.abs(pixels(body["data"][0]) - references[(prompt, seed, steps)]).max()
                                if body["data"][0]["seed"] != seed or diff > 1:
                                    with lock:
                                        wrong.append((prompt, seed, steps, int(diff)))
                            elif status != 429:
                                with lock:
                                    wrong.append((prompt, seed, steps, f"status {status}: {r.text[:200]}"))
                        elif roll < 0.85:
                            name, request, expected = rng.choice(INVALID)
                            r = c.post(GENERATE, **request)
                            status = r.status_code
                            if status != expected:
                                with lock:
                                    wrong.append((name, f"status {status}, expected {expected}: {r.text[:200]}"))
                        else:
                            try:
                                c.post(GENERATE, timeout=rng.uniform(0.2, 1.0),
                                       json={"prompt": rng.choice(POOL)[0], "num_inference_steps": 60,
                                             "seed": rng.randrange(1000)})
                                status = "finished"
                            except httpx.TimeoutException:
                                status = "abandoned"
                    except httpx.TransportError as e:
                        status = f"transport error {type(e).__name__}"
                    with lock:
                        sent[str(status)] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
        start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        # Abandoned requests are answered (499, or 504 past the deadline) once the server sees them go.
        settle = time.time() + 30
        while time.time() < settle and metric_counts(client).get("unfinished", 1) > 0:
            time.sleep(0.5)
        counts = metric_counts(client)
        memory_after = {pid: rss_mib(pid) for pid in processes}
        healthy = client.get("/health").status_code == 200
    finally:
        client.close()
        server.stop()
    # The server's counts, without the reference requests, against the clients'.
    served = {status: n for status, n in counts.items() if status != "unfinished" and n}
    served["200"] = served.get("200", 0) - len(POOL)
    expected = {k: v for k, v in sent.items() if k.isdigit()}
    abandoned = sent.get("abandoned", 0)
    finished_abandoned = sent.get("finished", 0)  # a long request that finished before its client left
    mismatch = {}
    for status in set(served) | set(expected):
        want = expected.get(status, 0) + (finished_abandoned if status == "200" else 0)
        if status in ("499", "504"):
            continue
        if served.get(status, 0) != want:
            mismatch[status] = (served.get(status, 0), want)
    gone = served.get("499", 0) + served.get("504", 0)
    if gone != abandoned + sent.get("499", 0) + sent.get("504", 0):
        mismatch["499+504"] = (gone, abandoned + sent.get("499", 0) + sent.get("504", 0))
    growth = {pid: memory_after[pid] - memory_before[pid] for pid in memory_before}
    result = dict(seconds=round(elapsed, 1), concurrency=args.concurrency, client_statuses=dict(sent),
                  server_statuses=served, unfinished_at_end=counts.get("unfinished"), wrong_answers=wrong[:20],
                  num_wrong=len(wrong), metrics_mismatch=mismatch, healthy_at_end=healthy,
                  rss_mib_before={str(k): round(v, 1) for k, v in memory_before.items()},
                  rss_growth_mib={str(k): round(v, 1) for k, v in growth.items()},
                  memory_bound_mib=args.memory_bound_mib)
    ok = (not wrong and not mismatch and healthy and counts.get("unfinished") == 0
          and max(growth.values()) <= args.memory_bound_mib)
    result["ok"] = ok
    print(json.dumps(result, indent=1))
    if args.out:
        with open(os.path.join(args.out, "soak_serve.json"), "w") as f:
            json.dump(result, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
