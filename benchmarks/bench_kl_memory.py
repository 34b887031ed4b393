"""Benchmark 7 — memory of the neutral-prompt KL (notebook 06, ``refusal_steering.evaluate_condition``): KL(P_unsteered
‖ P_steered) over every position of a batch of chat-formatted prompts, on a random logit block the size of one
Qwen batch (8 prompts × 60 positions × 151 936 vocabulary; 2 × 8 × 1 000 with --quick).

Compared: the whole block in float64 at once (the formula before 2026-11-22: the block, its two log-softmaxes,
an exp and a difference, each [8, 60, 151 936] float64) and :func:`crvlm_core.metrics.kl_to_unsteered`, which works
in chunks of 16 positions. Peak RSS rise and time of each; the values must agree. No model is loaded.
"""

from __future__ import annotations

import time

import torch

from common import Bench, PeakRSS, parser, setup_torch


def whole_block_kl(steered: torch.Tensor, unsteered: torch.Tensor, mask: torch.Tensor) -> float:
    """The earlier implementation: every position in float64 at once."""
    log_s = torch.log_softmax(steered.double(), -1)
    log_u = torch.log_softmax(unsteered.double(), -1)
    kl = (log_u.exp() * (log_u - log_s)).sum(-1)
    return float(kl[mask.bool()].mean())


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="prompts per block (default 8; 2 with --quick)")
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.metrics import kl_to_unsteered

    b = args.batch or (2 if args.quick else 8)
    seq, vocab = (8, 1000) if args.quick else (60, 151_936)
    bench = Bench("kl_memory", args, block=[b, seq, vocab])
    g = torch.Generator().manual_seed(0)
    steered, unsteered = torch.randn(b, seq, vocab, generator=g), torch.randn(b, seq, vocab, generator=g)
    mask = torch.ones(b, seq)
    mask[0, : seq // 4] = 0  # left padding of the first prompt
    res = {"block_float32_mb": round(steered.numel() * 4 / 2**20, 1)}
    for name, fn in (("whole_block_float64", whole_block_kl), ("chunked", kl_to_unsteered)):
        with PeakRSS(0.005) as mem:
            start = time.perf_counter()
            value = fn(steered, unsteered, mask)
            seconds = time.perf_counter() - start
        res[name] = {"peak_rss_rise_mb": round(mem.delta / 2**20, 1), "seconds": round(seconds, 2), "kl": value}
        bench.log(f"{name}: +{res[name]['peak_rss_rise_mb']:.0f} MB, {seconds:.1f} s, KL {value:.6f}")
    res["same_value"] = abs(res["chunked"]["kl"] - res["whole_block_float64"]["kl"]) < 1e-9
    bench.results.update(res)
    bench.add(f"KL over a [{b}, {seq}, {vocab}] logit block: whole block in float64, peak RSS rise",
              res["whole_block_float64"]["peak_rss_rise_mb"], "MB")
    bench.add("KL in chunks of 16 positions (crvlm), peak RSS rise", res["chunked"]["peak_rss_rise_mb"], "MB")
    bench.add("same KL value (|Δ| < 1e-9)", res["same_value"], "", "yes", res["same_value"])
    bench.write()


if __name__ == "__main__":
    main()
