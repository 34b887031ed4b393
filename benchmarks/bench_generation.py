"""Benchmark 2 — steered generation throughput: greedy batched generation at batch 1, 8 and 32 (1 and 8 with
--quick), unsteered vs vector-steered (the teacher-forced refusal vector, α = 1) vs calibrator-steered (CR-VLM as
``crvlm fit --method crvlm`` builds it: prefill gate) and, for the explanation, the calibrator with the paper's own
gate (no prefill pass). All through ``crvlm_core.steer.interventions.steered_generate``.

Throughput counts the decoding steps actually run: batch × (generated length of the batch) / wall time, so a
steered batch that stops early (every row emitted EOS) is not credited for tokens it did not compute. The
calibrator is fitted quickly (few samples and epochs; speed does not depend on its quality) and cached under
``outputs/bench/cache``. Goals (issue #9): calibrator-steered ≥ 0.85× unsteered tokens/s at batch 32; batch-32
throughput ≥ 10× batch 1.
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


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--long-tokens", type=int, default=128,
                   help="also time unsteered vs calibrator at the largest batch with this many new tokens (0: skip)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32; quick 1,8)")
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.models.loading import load_model
    from crvlm_core.methods.refusal_vectors import VectorConfig, fit_vector
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.steer.interventions import AddVector

    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1, 8] if args.quick else [1, 8, 32])
    new = args.max_new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    bench = Bench("generation", args, batches=batches, max_new_tokens=new, repeats=repeats, greedy=True)
    handle = load_model(args.model)
    cal = quick_calibrator(handle, args.quick)
    paper = quick_calibrator(handle, args.quick, gate_layer=None)
    layers = list(cal.layers)
    vector = cal.vector if cal.vector is not None else fit_vector(handle, prompts(16), VectorConfig(layers=layers), progress=False)
    variants = {
        "unsteered": [],
        "vector": [AddVector(vector.directions, tuple(layers), 1.0)],
        "calibrator": [cal],
        "calibrator_paper_gate": [paper],
    }
    bench.params.update(layers=layers, gate_layer=cal.gate_layer)
    counter = StepCounter(handle)
    try:
        for b in batches:
            ps = [s.prompt for s in prompts(b)]
            steps: dict[str, int] = {}

            def run(name, ivs, n_new=new):
                counter.reset()
                steered_generate(handle, ps, ivs, max_new_tokens=n_new, batch_size=b)
                steps[name] = counter.steps

            for name, ivs in variants.items():  # warm-up, not timed
                run(name, ivs, 2)
            fns = {name: (lambda name=name, ivs=ivs: run(name, ivs)) for name, ivs in variants.items()}
            res = interleaved(fns, repeats, warmup=0)
            for name, t in res.items():
                t.update(tokens=steps[name], tokens_per_s=steps[name] / t["median"],
                         tokens_per_cpu_s=steps[name] / t["cpu_median"])
                bench.log(f"batch {b} {name}: {t['tokens_per_s']:.1f} tok/s ({t['median']:.2f} s, "
                          f"cpu {t['cpu_median']:.2f} s, {steps[name]} tokens)")
            for name in variants:
                res[name]["ratio_to_unsteered"] = res[name]["tokens_per_s"] / res["unsteered"]["tokens_per_s"]
                res[name]["cpu_ratio_to_unsteered"] = (res[name]["tokens_per_cpu_s"]
                                                       / res["unsteered"]["tokens_per_cpu_s"])
            bench.results[f"batch{b}"] = res
            for name in variants:
                goal = met = None
                if name == "calibrator" and b == 32:
                    goal, met = "≥ 0.85", res[name]["ratio_to_unsteered"] >= 0.85
                bench.add(f"generate batch {b}: {name} tok/s", res[name]["tokens_per_s"], "tok/s")
                if name != "unsteered":
                    bench.add(f"generate batch {b}: {name} / unsteered", res[name]["ratio_to_unsteered"], "×", goal, met)
                    bench.add(f"generate batch {b}: {name} / unsteered (CPU time)", res[name]["cpu_ratio_to_unsteered"], "×")
        if args.long_tokens and not args.quick:
            # the prefill gate costs one prompt pass per batch: its share falls as generations get longer
            b = max(batches)
            ps = [s.prompt for s in prompts(b)]
            steps = {}
            fns = {name: (lambda name=name: run(name, variants[name], args.long_tokens))
                   for name in ("unsteered", "calibrator")}
            res = interleaved(fns, 1, warmup=0)
            ratio = (steps["calibrator"] / res["calibrator"]["median"]) / (steps["unsteered"] / res["unsteered"]["median"])
            bench.results[f"batch{b}_long{args.long_tokens}"] = {**res, "tokens": steps, "ratio_to_unsteered": ratio}
            bench.log(f"batch {b}, {args.long_tokens} new tokens: calibrator / unsteered {ratio:.2f}")
            bench.add(f"generate batch {b}, {args.long_tokens} new tokens: calibrator / unsteered", ratio, "×")
    finally:
        counter.close()
    if 1 in batches and max(batches) >= 8:
        top = max(batches)
        r = bench.results[f"batch{top}"]["unsteered"]["tokens_per_s"] / bench.results["batch1"]["unsteered"]["tokens_per_s"]
        bench.results[f"scaling_batch{top}_vs_batch1"] = r
        bench.add(f"unsteered batch {top} / batch 1 throughput", r, "×",
                  "≥ 10" if top == 32 else None, (r >= 10) if top == 32 else None)
    bench.write()


if __name__ == "__main__":
    main()
