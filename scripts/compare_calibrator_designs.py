"""Per-layer vs shared CR-VLM calibrator, measured on SmolLM2-135M: fit time, final losses, held-out gate
separation, refusal rate / over-refusal of steered generation, generation speed.

Scope: MMLU biology in-scope, everything else out; 48 train / 12 test samples per scope; steered layers 8, 10, 12;
prefill gate "auto" (layer 27). The target scale λ is the smallest of ``--scales`` at which the plain
teacher-forced vector (added at the same layers with α = λ) refuses some held-out out-of-scope prompt: SmolLM2
refuses nothing by itself, and at α = 1 the vector does not make it refuse either.

Writes ``outputs/measurements/calibrator_designs.json``; prints a table. Run with one thread (the machine is shared):

    .venv/bin/python scripts/compare_calibrator_designs.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crvlm_core.methods.crvlm.config import CrvlmConfig  # noqa: E402
from crvlm_core.methods.crvlm.steering import fit_crvlm  # noqa: E402
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.core.io import atomic_write_json  # noqa: E402
from crvlm_core.models.loading import load_model  # noqa: E402
from crvlm_core.core.paths import outputs_dir  # noqa: E402
from crvlm_core.evaluation import evaluate  # noqa: E402
from crvlm_core.methods.refusal_vectors import VectorConfig, fit_vector  # noqa: E402
from crvlm_core.steer.interventions import AddVector  # noqa: E402

KEEP = ("refusal_rate_out", "over_refusal_in", "mb_score", "tokens_per_second", "generation_seconds",
        "mean_refusal_score_out", "mean_refusal_score_in")


def _eval(handle, test, interventions, max_new_tokens):
    res = evaluate(handle, test, interventions, max_new_tokens=max_new_tokens, progress=False)
    m = {k: res.metrics[k] for k in KEEP}
    m["example_out"] = next(r["response"] for r in res.rows if r["scope"] == "out")
    m["example_in"] = next(r["response"] for r in res.rows if r["scope"] == "in")
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 10, 12])
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    handle = load_model(args.model, device="cpu")
    samples = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    train, test = split(samples, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    vector = fit_vector(handle, train, VectorConfig("teacher-forced", layers=args.layers), progress=False)
    layers = tuple(args.layers)

    result = {"model": args.model, "layers": list(layers), "n_train_per_scope": args.n_train,
              "n_test_per_scope": args.n_test, "epochs": args.epochs, "width": args.width, "gate_layer": "auto",
              "max_new_tokens": args.max_new_tokens, "threads": args.threads, "seed": args.seed, "judge": "keyword",
              "baselines": {}, "designs": {}}
    print("baseline: no steering", flush=True)
    result["baselines"]["none"] = _eval(handle, test, [], args.max_new_tokens)
    target_scale = None
    for scale in args.scales:
        print(f"baseline: plain vector alpha={scale}", flush=True)
        m = _eval(handle, test, [AddVector(vector.directions, layers, scale)], args.max_new_tokens)
        result["baselines"][f"vector_alpha_{scale:g}"] = m
        if m["refusal_rate_out"] > 0:
            target_scale = scale
            break
    if target_scale is None:
        target_scale = args.scales[-1]
        result["note"] = f"the plain vector refused nothing at any of {args.scales}; using the largest"
    result["target_scale"] = target_scale

    for name, shared in (("per_layer", False), ("shared", True)):
        print(f"fit: {name} (target_scale {target_scale:g})", flush=True)
        config = CrvlmConfig(layers=layers, gate_layer="auto", target_scale=target_scale, width=args.width,
                             epochs=args.epochs, shared=shared, seed=args.seed)
        steering = fit_crvlm(handle, train, config, vector, progress=False)
        n_params = sum(p.numel() for p in steering.calibrator.parameters())
        t0 = time.perf_counter()
        rho = steering.gate(handle, test)
        gate_seconds = time.perf_counter() - t0
        scopes = [s.scope for s in test]
        rho_in = rho[[i for i, s in enumerate(scopes) if s == "in"]]
        rho_out = rho[[i for i, s in enumerate(scopes) if s == "out"]]
        print(f"eval: {name}", flush=True)
        ev = _eval(handle, test, [steering], args.max_new_tokens)
        final = {k: v for k, v in steering.info["final_losses"].items() if isinstance(v, (int, float))}
        result["designs"][name] = {
            "shared": shared, "n_params": n_params, "fit_seconds": steering.info["fit_seconds"],
            "final_losses": final, "gate_in_mean": float(rho_in.mean()), "gate_out_mean": float(rho_out.mean()),
            "gate_separation": float(rho_out.mean() - rho_in.mean()),
            "gate_auc": float(roc_auc_score([0] * len(rho_in) + [1] * len(rho_out), torch.cat([rho_in, rho_out]))),
            "gate_seconds": gate_seconds, **ev}

    out = Path(args.out) if args.out else outputs_dir() / "measurements" / "calibrator_designs.json"
    atomic_write_json(out, result)

    rows = [("design", "params", "fit s", "L_total", "L_out", "L_in", "rho_in", "rho_out", "R", "ORR", "tok/s")]
    for name, b in result["baselines"].items():
        rows.append((name, "-", "-", "-", "-", "-", "-", "-", f"{b['refusal_rate_out']:.2f}",
                     f"{b['over_refusal_in']:.2f}", f"{b['tokens_per_second']:.1f}"))
    for name, d in result["designs"].items():
        fl = d["final_losses"]
        rows.append((name, f"{d['n_params'] / 1e6:.2f}M", f"{d['fit_seconds']:.0f}", f"{fl.get('total', float('nan')):.3f}",
                     f"{fl.get('loss_out', float('nan')):.3f}", f"{fl.get('loss_in', float('nan')):.3f}",
                     f"{d['gate_in_mean']:.3f}", f"{d['gate_out_mean']:.3f}", f"{d['refusal_rate_out']:.2f}",
                     f"{d['over_refusal_in']:.2f}", f"{d['tokens_per_second']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"target_scale {target_scale:g}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
