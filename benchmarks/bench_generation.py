"""Benchmark 2 — steered generation throughput: greedy batched generation at batch 1 and 32 (and any given with
--batches; 1 and 8 with --quick), unsteered vs vector-steered (the teacher-forced refusal vector, α = 1) vs the
CR-VLM calibrator as ``crvlm fit --method crvlm`` builds it (prefill gate read in the one shared prompt pass,
``gate_pass="shared"``), the same calibrator with the gate read in a separate pass (the default before issue #23),
the calibrator with the paper's own gate (no prefill pass), and CAST with its condition read in a separate pass
(its default) / in the shared pass.
All through ``crvlm_core.steer.generate.steered_generate``, the variants timed round-robin in one run.

Throughput counts the decoding steps actually run: batch × (generated length of the batch) / wall time, so a
steered batch that stops early (every row emitted EOS) is not credited for tokens it did not compute. The
calibrator and CAST are fitted quickly (few samples and epochs; speed does not depend on their quality) and cached
under ``outputs/bench/cache``. Goals: calibrator-steered ≥ 0.95× unsteered tokens/s at batch 32 / 32 new tokens
and at batch 1 (issue #23; the JSON's ``ratio_calibrated_vs_unsteered_b32_t32`` and ``…_b1_t32``); batch-32
throughput ≥ 10× batch 1 (issue #9). ``--out FILE.json`` writes the result there.
"""

from __future__ import annotations


from common import Bench, interleaved, parser, prompts, setup_torch


def quick_calibrator(handle, quick: bool, gate_layer="auto", progress: bool = False):
    """A CR-VLM calibrator at the default steered layer, fitted on few samples (cached per model and settings)."""
    from crvlm_core.core.paths import outputs_dir
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split
    from crvlm_core.methods.crvlm.calibrated import load_calibrated
    from crvlm_core.methods.crvlm.config import CrvlmConfig
    from crvlm_core.methods.crvlm.steering import fit_crvlm

    n, epochs = (8, 1) if quick else (24, 3)
    tag = f"{handle.spec.replace('/', '_')}-n{n}-e{epochs}-gate{gate_layer}"
    folder = outputs_dir() / "bench" / "cache" / f"calibrator-{tag}"
    if folder.exists():
        try:
            return load_calibrated(folder, handle)
        except Exception:  # damaged, an older format, or another model: fitted again and replaced
            pass
    data = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    train, _ = split(data, n_train=n, seed=7)
    cal = fit_crvlm(handle, train, CrvlmConfig(gate_layer=gate_layer, epochs=epochs), progress=progress)
    cal.save(folder, force=True)
    return cal


class StepCounter:
    """Counts the decoding steps of each generated batch by wrapping the handle's ``decode_new`` (per instance)."""

    def __init__(self, handle):
        self.handle, self.steps, self.rows = handle, 0, 0
        self._orig = handle.decode_new

        def counted(ids, prompt_len):
            self.steps += int(ids.shape[1] - prompt_len) * int(ids.shape[0])
            self.rows += int(ids.shape[0])
            return self._orig(ids, prompt_len)

        handle.decode_new = counted

    def reset(self):
        self.steps = self.rows = 0

    def close(self):
        del self.handle.decode_new  # back to the class method


def quick_cast(handle, vector, quick: bool):
    """CAST around ``vector`` with its condition fitted on the same few samples as :func:`quick_calibrator`."""
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split
    from crvlm_core.methods.baselines.cast import fit_cast

    n = 8 if quick else 24
    train, _ = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=n, seed=7)
    cast, _ = fit_cast(handle, train, vector, progress=False)
    return cast


def variants_for(handle, quick: bool) -> dict:
    """Variant name → interventions."""
    import dataclasses

    from crvlm_core.steer.interventions import AddVector

    cal = quick_calibrator(handle, quick)
    paper = quick_calibrator(handle, quick, gate_layer=None)
    cast = quick_cast(handle, cal.vector, quick)
    return {
        "unsteered": [],
        "vector": [AddVector(cal.vector.directions, tuple(cal.layers), 1.0)],
        "calibrator": [dataclasses.replace(cal, gate_pass="shared")],
        "calibrator_separate_pass": [dataclasses.replace(cal, gate_pass="separate")],
        "calibrator_paper_gate": [paper],
        "cast": [dataclasses.replace(cast, gate_pass="separate")],
        "cast_shared_pass": [dataclasses.replace(cast, gate_pass="shared")],
    }


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--long-tokens", type=int, default=0,
                   help="also time unsteered vs the calibrators at the largest batch with this many new tokens")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32; quick 1,8)")
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.models.loading import load_model
    from crvlm_core.steer.generate import steered_generate

    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8] if args.quick else [1, 32])
    new = args.max_new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    bench = Bench("generation", args, batches=batches, max_new_tokens=new, repeats=repeats, greedy=True)
    handle = load_model(args.model)
    variants = variants_for(handle, args.quick)
    cal = variants["calibrator"][0]
    bench.params.update(layers=list(cal.layers), gate_layer=cal.gate_layer,
                        cast_condition_layer=variants["cast"][0].gate_layer)
    counter = StepCounter(handle)

    def run(name, ps, b, n_new, steps):
        counter.reset()
        steered_generate(handle, ps, variants[name], max_new_tokens=n_new, batch_size=b)
        steps[name] = counter.steps

    try:
        for b in batches:
            ps = [s.prompt for s in prompts(b)]
            steps: dict[str, int] = {}
            for name in variants:  # warm-up, not timed
                run(name, ps, b, 2, steps)
            fns = {name: (lambda name=name: run(name, ps, b, new, steps)) for name in variants}
            res = interleaved(fns, repeats, warmup=0)
            record(bench, f"batch{b}", res, steps, b)
            bench.results[f"ratio_calibrated_vs_unsteered_b{b}_t{new}"] = res["calibrator"]["ratio_to_unsteered"]
            bench.results[f"ratio_cast_vs_unsteered_b{b}_t{new}"] = res["cast"]["ratio_to_unsteered"]
            for name in variants:
                goal = met = None
                if name == "calibrator" and b in (1, 32) and new == 32:
                    goal, met = "≥ 0.95", res[name]["ratio_to_unsteered"] >= 0.95
                bench.add(f"generate batch {b}: {name} tok/s", res[name]["tokens_per_s"], "tok/s")
                if name != "unsteered":
                    bench.add(f"generate batch {b}: {name} / unsteered", res[name]["ratio_to_unsteered"], "×", goal, met)
                    bench.add(f"generate batch {b}: {name} / unsteered (CPU time)", res[name]["cpu_ratio_to_unsteered"], "×")
        if args.long_tokens and not args.quick:
            b = max(batches)
            ps = [s.prompt for s in prompts(b)]
            steps = {}
            names = ("unsteered", "calibrator", "calibrator_separate_pass")
            res = interleaved({n: (lambda n=n: run(n, ps, b, args.long_tokens, steps)) for n in names}, 1, warmup=0)
            record(bench, f"batch{b}_long{args.long_tokens}", res, steps, b)
            for n in names[1:]:
                bench.add(f"generate batch {b}, {args.long_tokens} new tokens: {n} / unsteered",
                          res[n]["ratio_to_unsteered"], "×")
    finally:
        counter.close()
    if 1 in batches and max(batches) >= 8:
        top = max(batches)
        unsteered = {k: bench.results[k]["unsteered"]["tokens_per_s"] for k in (f"batch{top}", "batch1")}
        r = unsteered[f"batch{top}"] / unsteered["batch1"]
        bench.results[f"scaling_batch{top}_vs_batch1"] = r
        bench.add(f"unsteered batch {top} / batch 1 throughput", r, "×",
                  "≥ 10" if top == 32 else None, (r >= 10) if top == 32 else None)
    bench.write()


def record(bench, key: str, res: dict, steps: dict, b: int) -> None:
    """Tokens/s and ratios to unsteered (wall and CPU time) of one timed round into ``bench.results[key]``."""
    for name, t in res.items():
        t.update(tokens=steps[name], tokens_per_s=steps[name] / t["median"],
                 tokens_per_cpu_s=steps[name] / t["cpu_median"])
        bench.log(f"{key} {name}: {t['tokens_per_s']:.1f} tok/s ({t['median']:.2f} s, cpu {t['cpu_median']:.2f} s, "
                  f"{steps[name]} tokens)")
    for name in res:
        res[name]["ratio_to_unsteered"] = res[name]["tokens_per_s"] / res["unsteered"]["tokens_per_s"]
        res[name]["cpu_ratio_to_unsteered"] = res[name]["tokens_per_cpu_s"] / res["unsteered"]["tokens_per_cpu_s"]
    bench.results[key] = res


if __name__ == "__main__":
    main()
