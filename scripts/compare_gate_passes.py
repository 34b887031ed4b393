"""The prefill gate read in a separate prompt pass vs in the one shared pass (issue #23), on notebook 02's split:
refusal rates of CR-VLM (as `crvlm fit --method crvlm` builds it: gate at 90 % depth + behavioural stage) and of
CAST, with 95 % bootstrap intervals and the verdicts that flip.

Split: bundled MMLU, biology in scope, 100 + 100 training and 50 + 50 held-out questions (seed 42), steered layer a
third of the way up, 16 new tokens, keyword judge: notebook 02's settings. Rows:

- ``crvlm separate`` — fitted and generated with ``gate_pass="separate"`` (the default before #23);
- ``crvlm shared`` — fitted (behavioural stage) and generated with ``gate_pass="shared"`` (the default now);
- ``crvlm separate-fit, shared pass`` — the first calibrator generated with the shared pass (what an artifact
  written before #23 would give if switched);
- ``cast separate`` / ``cast shared`` — one CAST fit, generated both ways.

Fits and evaluations go through the caches in ``outputs/cache`` (an unchanged rerun takes minutes). Writes
``outputs/measurements/gate_pass.json``. Run alone on the cores (heavy):

    .venv/bin/python scripts/compare_gate_passes.py
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crvlm_core.core.io import atomic_write_json  # noqa: E402
from crvlm_core.core.paths import outputs_dir  # noqa: E402
from crvlm_core.data.bundled import load_dataset  # noqa: E402
from crvlm_core.data.splits import assign_scope, split  # noqa: E402
from crvlm_core.evaluation import evaluate  # noqa: E402
from crvlm_core.methods.baselines.cast import fit_cast  # noqa: E402
from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig  # noqa: E402
from crvlm_core.methods.crvlm.steering import fit_crvlm  # noqa: E402
from crvlm_core.methods.refusal_vectors import VectorConfig, default_layers, fit_vector  # noqa: E402
from crvlm_core.metrics import scope_metrics  # noqa: E402
from crvlm_core.models.loading import load_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cache = outputs_dir() / "cache"
    handle = load_model(args.model)
    train, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=args.n_train,
                        n_test=args.n_test, seed=42)
    layers = default_layers(handle)
    vector = fit_vector(handle, train, VectorConfig("teacher-forced", layers=layers, batch_size=8), progress=False)
    steerings = {}
    for mode in ("separate", "shared"):
        print(f"fit: crvlm, behavioural stage with gate_pass={mode}", flush=True)
        config = CrvlmConfig(layers=layers, gate_pass=mode, behavioural=BehaviouralConfig())
        steerings[mode] = fit_crvlm(handle, train, config, vector, cache_dir=cache / "calibrators", progress=False)
    print("fit: cast", flush=True)
    cast, search = fit_cast(handle, train, vector, progress=False)
    rows = {
        "crvlm separate": [steerings["separate"]],
        "crvlm shared": [steerings["shared"]],
        "crvlm separate-fit, shared pass": [dataclasses.replace(steerings["separate"], gate_pass="shared")],
        "cast separate": [dataclasses.replace(cast, gate_pass="separate")],
        "cast shared": [dataclasses.replace(cast, gate_pass="shared")],
    }
    result = {"model": args.model, "split": {"dataset": "mmlu", "in_scope": ["biology"], "n_train": args.n_train,
              "n_test": args.n_test, "seed": 42}, "layers": list(layers), "gate_layer": steerings["shared"].gate_layer,
              "cast_condition_layer": cast.gate_layer, "max_new_tokens": args.max_new_tokens, "judge": "keyword",
              "rows": {}}
    verdicts = {}
    for name, ivs in rows.items():
        print(f"eval: {name}", flush=True)
        res = evaluate(handle, test, ivs, max_new_tokens=args.max_new_tokens, batch_size=8, progress=False,
                       cache_dir=cache / "evaluations")
        verdicts[name] = {r["id"]: bool(r["refused"]) for r in res.rows}
        m = scope_metrics([r["refused"] for r in res.rows], [r["scope"] for r in res.rows], ci=True)
        m["tokens_per_second"] = res.metrics.get("tokens_per_second")
        result["rows"][name] = m
        print(f"  R {m['refusal_rate_out']:.2f}  ORR {m['over_refusal_in']:.2f}  MB {m['mb_score']:.3f}", flush=True)
    for name, ref in (("crvlm shared", "crvlm separate"), ("crvlm separate-fit, shared pass", "crvlm separate"),
                      ("cast shared", "cast separate")):
        flips = [i for i in verdicts[name] if verdicts[name][i] != verdicts[ref][i]]
        result["rows"][name]["verdicts_differing_from"] = {"row": ref, "n": len(flips), "ids": flips}
    out = Path(args.out) if args.out else outputs_dir() / "measurements" / "gate_pass.json"
    atomic_write_json(out, result)
    print(f"{'row':34s} {'R':>16s} {'ORR':>16s} {'MB':>16s}  flips")
    for name, m in result["rows"].items():
        ci = {k: m[f"{k}_ci"] for k in ("refusal_rate_out", "over_refusal_in", "mb_score")}
        cells = [f"{m[k]:.2f} [{ci[k][0]:.2f},{ci[k][1]:.2f}]" for k in ci]
        flips = m.get("verdicts_differing_from", {}).get("n", "")
        print(f"{name:34s} {cells[0]:>16s} {cells[1]:>16s} {cells[2]:>16s}  {flips}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
