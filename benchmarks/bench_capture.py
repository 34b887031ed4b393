"""Benchmark 1 — activation capture: all-layer last-token capture through ``crvlm_core.extract`` against a plain
forward without capture and against plain PyTorch forward hooks, on 64 and 256 prompts (8 and 16 with --quick;
``--sizes`` chooses).

Every variant runs the same left-padded batches (``handle.build_inputs``, batch 8), grouped by prompt length as
``extract`` groups them. Plain forwards are timed two
ways: the usual ``model(**enc)`` (vocabulary logits at every position) and with ``logits_to_keep=1`` (only the last
position's logits — the strict baseline, since extraction skips the vocabulary projection). The goal (issue #9) is
capture ≤ 1.05× a plain forward; it is judged against the strict baseline. One batch of every variant warms up first;
after it every pass is timed (round-robin over the variants, ``--repeats`` times per size) and the JSON is rewritten
after each size.
"""

from __future__ import annotations

import torch

from common import Bench, PeakRSS, parser, prompts, setup_torch, summarize, timed


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated prompt counts (default 64,256; 8,16 with --quick)")
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.extract import extract, prompt_batches
    from crvlm_core.models.loading import load_model
    from crvlm_core.steer.score import accepts_logits_to_keep as _accepts_logits_to_keep

    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([8, 16] if args.quick else [64, 256])
    repeats = args.repeats or (1 if args.quick else 2)
    batch = 8
    bench = Bench("capture", args, sizes=sizes, repeats=repeats, batch_size=batch, position="last", layers="all")
    handle = load_model(args.model)
    bench.results["load_seconds"] = round(handle.load_seconds, 2)
    layers = list(range(handle.n_layers))
    keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(handle) else {}

    def plain_full(samples, encs):
        with torch.no_grad():
            for enc in encs:
                handle.hf_model(**enc)

    def plain_last(samples, encs):
        with torch.no_grad():
            for enc in encs:
                handle.hf_model(**enc, **keep)

    def hooks(samples, encs):
        reads: list[torch.Tensor] = []
        hs = [handle.torch_layers[i].register_forward_hook(
            lambda _m, _i, out: reads.append((out[0] if isinstance(out, tuple) else out)[:, -1].detach().cpu()))
            for i in layers]
        try:
            with torch.no_grad():
                for enc in encs:
                    handle.hf_model(**enc, **keep)
        finally:
            for h in hs:
                h.remove()
        return reads

    def crvlm(samples, encs):  # the library call: builds its own batches, no cache
        return extract(handle, samples, layers=layers, batch_size=batch, cache_dir=False, progress=False)

    fns = {"plain_forward_full_logits": plain_full, "plain_forward": plain_last, "plain_hooks": hooks,
           "crvlm_extract": crvlm}
    # one untimed batch of every variant first (first-call costs: thread pools, nnsight's trace set-up); after it
    # every pass is timed, with its memory, round-robin over the variants
    warm = prompts(batch)
    warm_encs = [handle.build_inputs([s.prompt for s in warm])]
    for fn in fns.values():
        fn(warm, warm_encs)

    for n in sizes:
        samples = prompts(n)
        # the batches extract() makes (prompts of similar length together), so every variant does the same work
        order = [idx for _, idx in prompt_batches(handle, [s.prompt for s in samples], [False] * n, batch)]
        encs = [handle.build_inputs([samples[k].prompt for k in idx]) for idx in order]
        walls = {k: [] for k in fns}
        cpus = {k: [] for k in fns}
        peak = {k: 0.0 for k in fns}
        last = {}
        for _ in range(max(1, repeats)):
            for name, fn in fns.items():
                with PeakRSS() as mem:
                    w, c = timed(lambda: last.__setitem__(name, fn(samples, encs)))
                walls[name].append(w)
                cpus[name].append(c)
                peak[name] = max(peak[name], round(mem.delta / 2**20, 1))
        res = {name: {**summarize(walls[name], cpus[name]), "peak_rss_delta_mb": peak[name]} for name in fns}
        for name, t in res.items():
            bench.log(f"n={n} {name}: {t['median']:.2f} s (cpu {t['cpu_median']:.2f} s, +{peak[name]:.0f} MB)")
        # correctness: the library's reads equal the hook reads (same batches, last token, every layer)
        hook_reads, acts = last["plain_hooks"], last["crvlm_extract"].acts
        ref = torch.empty_like(acts)
        for b, idx in enumerate(order):
            ref[idx] = torch.stack(hook_reads[b * len(layers):(b + 1) * len(layers)], 1).float()
        res["max_abs_diff_vs_hooks"] = float((acts - ref).abs().max())
        base = res["plain_forward"]["median"]
        res["ratio_extract_vs_plain_forward"] = res["crvlm_extract"]["median"] / base
        res["ratio_hooks_vs_plain_forward"] = res["plain_hooks"]["median"] / base
        res["ratio_extract_vs_full_logits_forward"] = res["crvlm_extract"]["median"] / res["plain_forward_full_logits"]["median"]
        res["cpu_ratio_extract_vs_plain_forward"] = res["crvlm_extract"]["cpu_median"] / res["plain_forward"]["cpu_median"]
        bench.results[f"n{n}"] = res
        r = res["ratio_extract_vs_plain_forward"]
        bench.add(f"capture {n} prompts: extract / plain forward", r, "×", "≤ 1.05", r <= 1.05)
        bench.add(f"capture {n} prompts: extract / plain forward (CPU time)", res["cpu_ratio_extract_vs_plain_forward"], "×")
        bench.add(f"capture {n} prompts: plain hooks / plain forward", res["ratio_hooks_vs_plain_forward"], "×")
        bench.add(f"capture {n} prompts: extract / forward with all logits",
                  res["ratio_extract_vs_full_logits_forward"], "×")
        bench.add(f"capture {n} prompts: extract time", res["crvlm_extract"]["median"], "s")
        bench.add(f"capture {n} prompts: extract peak RSS rise", res["crvlm_extract"]["peak_rss_delta_mb"], "MB")
        bench.write()  # after every size: a long run that is stopped keeps what it measured


if __name__ == "__main__":
    main()
