"""Benchmark 4 — fitting costs: teacher-forced refusal-vector extraction (every layer, no cache), CR-VLM calibrator
training on cached activations (400 samples = 200 in + 200 out of scope, the default steered layers and prefill
gate, default epochs), one epoch of the behavioural loss on 16 of those samples (8 in + 8 out of scope, batch 4;
time and the rise of anonymous memory, i.e. tensors and graphs, not weight pages), and the LoRA baseline
(``crvlm_core.methods.baselines.lora``: target generation and adapter training, timed apart). --quick: 16 samples, 2 epochs,
2 + 2 behavioural samples, 4 LoRA steps. Goal (issue #9): calibrator training ≤ 60 s.
"""

from __future__ import annotations

import time

from common import Bench, PeakRSS, parser, setup_torch


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n-per-scope", type=int, default=None)
    args = p.parse_args(argv)
    setup_torch(args.threads)
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split
    from crvlm_core.methods.crvlm.behavioural import finetune_behavioural
    from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig
    from crvlm_core.methods.crvlm.steering import fit_crvlm
    from crvlm_core.methods.refusal_vectors import VectorConfig, default_layers, fit_vector
    from crvlm_core.models.loading import load_model

    n = args.n_per_scope or (8 if args.quick else 200)
    epochs = 2 if args.quick else None  # None: fit_crvlm's default
    handle = load_model(args.model)
    data = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    train, _ = split(data, n_train=n, seed=11)
    layers = default_layers(handle)
    bench = Bench("fitting", args, n_train=len(train), layers=layers)

    with PeakRSS() as mem:
        start = time.perf_counter()
        vector = fit_vector(handle, train, VectorConfig("teacher-forced", layers=layers), cache_dir=False, progress=False)
        t_vec = time.perf_counter() - start
    bench.results["teacher_forced_extraction"] = {"seconds": t_vec, "peak_rss_delta_mb": round(mem.delta / 2**20, 1),
                                                  "n_samples": len(train), "layers_read": "all"}
    bench.log(f"teacher-forced extraction: {t_vec:.1f} s")
    bench.add(f"teacher-forced vector extraction ({len(train)} samples)", t_vec, "s")

    fit_crvlm(handle, train, CrvlmConfig(layers=layers, epochs=1), vector, progress=False)  # fills the activation
    with PeakRSS() as mem:  # caches, so the timed fit trains only
        cal = fit_crvlm(handle, train, CrvlmConfig(layers=layers, **({"epochs": epochs} if epochs else {})), vector,
                        progress=False)
    t_cal = cal.info["fit_seconds"]
    bench.results["calibrator_training"] = {"seconds": t_cal, "n_states": cal.info["n_train_states"],
                                            "epochs": cal.calibrator.config.epochs, "layers": list(cal.layers),
                                            "gate_layer": cal.gate_layer,
                                            "peak_rss_delta_mb": round(mem.delta / 2**20, 1)}
    bench.log(f"calibrator training: {t_cal:.1f} s")
    bench.add(f"calibrator training ({len(train)} samples, cached activations)", t_cal, "s", "≤ 60", t_cal <= 60)

    k = 2 if args.quick else 8
    few = [s for s in train if s.scope == "out"][:k] + [s for s in train if s.scope == "in"][:k]
    with PeakRSS(0.005, anon=True) as mem:
        start = time.perf_counter()
        history = finetune_behavioural(cal, handle, few, BehaviouralConfig(epochs=1, batch_size=4), progress=False)
        t_beh = time.perf_counter() - start
    bench.results["behavioural_epoch"] = {"seconds": t_beh, "n_samples": len(few), "batch_size": 4,
                                          "anon_peak_rise_mb": round(mem.delta / 2**20, 1), "history": history}
    bench.log(f"behavioural epoch: {t_beh:.1f} s, +{mem.delta / 2**20:.0f} MB anonymous")
    bench.add(f"behavioural loss, one epoch ({len(few)} samples, batch 4)", t_beh, "s")
    bench.add("behavioural loss, peak rise of anonymous memory", round(mem.delta / 2**20, 1), "MB")

    try:
        from crvlm_core.methods.baselines import lora
        from crvlm_core.methods.baselines.lora import LoraTrainConfig
        have_lora = hasattr(lora, "train_lora") and hasattr(lora, "lora_targets")
    except Exception as exc:  # the module is being written, or broken
        have_lora, lora = False, None
        bench.results["lora_error"] = f"{type(exc).__name__}: {exc}"
    if have_lora:
        steps = 4 if args.quick else 60
        start = time.perf_counter()
        targets = lora.lora_targets(handle, train, progress=False)
        t_targets = time.perf_counter() - start
        start = time.perf_counter()
        _model, history = lora.train_lora(handle, train, targets, LoraTrainConfig(steps=steps), progress=False)
        t_lora = time.perf_counter() - start
        del _model
        bench.results["lora"] = {"targets_seconds": t_targets, "train_seconds": t_lora, "steps": steps,
                                 "final_loss": history[-1]["loss"] if history else None}
        bench.log(f"LoRA: targets {t_targets:.1f} s, training {t_lora:.1f} s ({steps} steps)")
        bench.add(f"LoRA baseline training ({steps} steps)", t_lora, "s")
        bench.add("LoRA baseline target generation (cached after first run)", t_targets, "s")
    else:
        bench.results["lora"] = "not available"
        bench.add("LoRA baseline training", "not available", "")
    bench.write()


if __name__ == "__main__":
    main()
