"""Benchmark — remote-safe traces: the cost of nnsight's local simulation of a remote server (``remote="local"``:
every trace serialized, rebuilt with the project's modules out of reach, then run here) against the same work run
plainly, for all-layer extraction, the refusal score with a vector, and steered generation (24 new tokens), on 32
prompts in batches of 8 (8 with --quick). The answers of both runs are compared token for token.

What it shows: the per-trace price of checking remote-safety, and that a remote run gives the local answers. It does
not measure NDIF (no network here): there, the network and the queue add to the serialization measured.
"""

from __future__ import annotations

import torch

from common import Bench, PeakRSS, interleaved, parser, prompts, setup_torch


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.extract import extract
    from crvlm_core.models.loading import load_model
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.steer.interventions import AddVector
    from crvlm_core.steer.score import refusal_score

    n = 8 if args.quick else 32
    repeats = args.repeats or (1 if args.quick else 2)
    bench = Bench("remote", args, n=n, repeats=repeats, batch_size=8, max_new_tokens=24)
    with PeakRSS() as peak:
        here = load_model(args.model)
        there = load_model(args.model, remote="local")
        samples = prompts(n)
        texts = [s.prompt for s in samples]
        vec = AddVector(torch.randn(here.n_layers, here.hidden_size, generator=torch.Generator().manual_seed(0)),
                        (here.n_layers // 3,), 4.0)
        work = {
            "extract": lambda h: extract(h, samples, cache_dir=None, progress=False),
            "refusal_score": lambda h: refusal_score(h, texts, [vec]),
            "generate": lambda h: steered_generate(h, texts, [vec], max_new_tokens=24),
        }
        for name, fn in work.items():
            bench.log(f"{name} …")
            times = interleaved({"local": lambda fn=fn: fn(here), "remote_local": lambda fn=fn: fn(there)}, repeats)
            ratio = times["remote_local"]["median"] / times["local"]["median"]
            bench.results[name] = {**times, "ratio": ratio}
            bench.add(f"{name}: remote=local / plain", round(ratio, 2), "×")
        same = steered_generate(here, texts, [vec], max_new_tokens=24) == steered_generate(there, texts, [vec],
                                                                                          max_new_tokens=24)
        bench.results["same_answers"] = same
        bench.add("generation: same answers", same, "", "yes", same)
    bench.results["peak_rss_gb"] = round(peak.peak / 2**30, 2)
    bench.write()


if __name__ == "__main__":
    main()
