"""Throughput of `crvlm serve`: requests/s and generated tokens/s at 1, 4 and 16 concurrent clients, for the plain
model and (with an artifact) the steered one. The real server runs in this process on a free loopback port; each
client sends non-streaming chat completions back to back. Writes ``outputs/bench/serve.json``.

    flock /tmp/crvlm-heavy.lock .venv/bin/python benchmarks/bench_serve.py --model qwen2.5-0.5b [--artifact DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

QUESTIONS = ["What is the function of mitochondria?", "What is Newton's second law?", "Name three noble gases.",
             "How do vaccines work?", "What causes the seasons on Earth?", "What is an enzyme?",
             "Explain what a black hole is.", "What is photosynthesis?"]


def _request(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        data = json.loads(resp.read())
    return time.perf_counter() - start, int(data["usage"]["completion_tokens"])


def measure(base: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``requests`` completions spread over ``clients`` concurrent clients; wall-clock throughput and latencies."""
    prompts = [QUESTIONS[k % len(QUESTIONS)] for k in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: _request(base, model, p, max_tokens), prompts))
    seconds = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"model": model, "clients": clients, "requests": requests, "max_tokens": max_tokens, "seconds": seconds,
            "requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds, "completion_tokens": tokens,
            "latency_mean_s": statistics.fmean(latencies), "latency_p50_s": latencies[len(latencies) // 2],
            "latency_max_s": latencies[-1]}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from crvlm_core.core.io import atomic_write_json
    from crvlm_core.models.loading import load_model
    from crvlm_core.core.paths import outputs_dir
    from crvlm_core.serve.batcher import ModelServer
    from crvlm_core.serve.limits import ServeLimits
    from crvlm_core.serve.server import running
    from crvlm_core.serve.variants import STEERED_SUFFIX, load_variants

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="model spec (the default model: qwen2.5-0.5b)")
    p.add_argument("--artifact", default=None, help="a `crvlm fit` folder: also benchmark <spec>:steered")
    p.add_argument("--clients", default="1,4,16", help="concurrency levels")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 × clients))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="the server's largest micro-batch")
    p.add_argument("--out", default=None, help="JSON to write (default outputs/bench/serve.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    handle = load_model(args.model)
    server = ModelServer(handle, load_variants(handle, args.artifact), ServeLimits(max_batch_size=args.batch_size))
    names = [handle.spec] + ([handle.spec + STEERED_SUFFIX] if args.artifact else [])
    rows = []
    with running(server) as base:
        _request(base, names[-1], QUESTIONS[0], 4)  # warm-up (first-call allocations, nnsight tracing set-up)
        for name in names:
            for clients in (int(c) for c in args.clients.split(",")):
                n = args.requests or max(8, 2 * clients)
                row = measure(base, name, clients, n, args.max_tokens)
                rows.append(row)
                print(f"[bench_serve] {name:24s} {clients:3d} clients: {row['requests_per_s']:.2f} req/s, "
                      f"{row['tokens_per_s']:.1f} tok/s, p50 latency {row['latency_p50_s']:.1f} s", flush=True)
        stats = dict(server.stats)
    result = {"benchmark": "serve", "model": handle.spec, "artifact": args.artifact, "rows": rows,
              "server_stats": stats, "batch_size": args.batch_size, "torch_threads": torch.get_num_threads(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out) if args.out else outputs_dir() / "bench" / "serve.json"
    atomic_write_json(out, result)
    print(f"[bench_serve] → {out}")
    return result


if __name__ == "__main__":
    main()
