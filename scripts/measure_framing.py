"""Plain vs framed (#25): one fitted artifact's R / ORR / MB on the project's plain questions and on the same questions
dressed in misleading framing (:mod:`crvlm_core.data.framing`, test templates), on the dev and held-out halves; for a
prefill-gated calibrator also the gate's own accuracy (ρ > 0.5 ⇔ out of scope), per framing style.

    .venv/bin/python scripts/measure_framing.py --artifact outputs/default/03_evaluation/artifacts/crvlm/artifact \\
        --in-scope biology [--judge llm-probe] [--gate-only] --out outputs/framing/crvlm-biology.json

The plain questions (dataset ``plain_questions``, written for the project, CC0) are split in half by question (seed 0):
``dev`` may be looked at while choosing a fix, ``held-out`` is reported. Answers are cached (``outputs/cache``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crvlm_core.cli.options import finite  # noqa: E402
from crvlm_core.data.framing import framing_parts as parts  # noqa: E402


def gate_accuracy(handle, steering, samples) -> dict:
    """The prefill gate's decisions: accuracy, and per framing style."""
    import torch

    from crvlm_core.extract import prompt_batches

    rho = torch.empty(len(samples))
    for _, idx in prompt_batches(handle, [s.prompt for s in samples], [False] * len(samples), 8):
        enc = handle.build_inputs([samples[k].prompt for k in idx])
        values = steering.calibrator.gate_values(steering.gate_summary(handle, enc))
        rho[idx] = values[steering.layers[0]].float().reshape(-1)
    right = [(float(r) > 0.5) == (s.scope == "out") for r, s in zip(rho, samples)]
    by_style: dict[str, list[bool]] = {}
    for ok, s in zip(right, samples):
        by_style.setdefault(s.extra.get("style") or "plain", []).append(ok)
    return {"accuracy": sum(right) / len(right), "n": len(right),
            "by_style": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_style.items())},
            "wrong": [s.id for ok, s in zip(right, samples) if not ok]}


def in_scope_vs_unsteered(handle, samples, rows, args, system) -> dict:
    """The in-scope questions answered without steering (cached): the refusals the model makes on its own (the floor
    under the steered over-refusal) and the fraction of steered answers whose first 20 tokens are the unsteered ones."""
    from crvlm_core.evaluation import evaluate
    from crvlm_core.metrics import unchanged_prefix_fraction

    inn = [s for s in samples if s.scope == "in"]
    plain = {r["id"]: r for r in evaluate(handle, inn, [], max_new_tokens=args.max_new_tokens, judge=args.judge,
                                          system=system, cache_dir=True, progress=False).rows}
    steered = [r for r in rows if r["id"] in plain]
    return {"unsteered_refused_in_ids": [i for i, r in plain.items() if r["refused"]],
            "unsteered_over_refusal_in": sum(r["refused"] for r in plain.values()) / max(1, len(plain)),
            "unchanged_20_in": unchanged_prefix_fraction([r["response"] for r in steered],
                                                         [plain[r["id"]]["response"] for r in steered],
                                                         handle.tokenizer, 20)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--in-scope", required=True)
    p.add_argument("--judge", default="llm-probe")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--gate-only", action="store_true", help="only the prefill gate's accuracy (no generation)")
    p.add_argument("--part", choices=["dev", "held-out", "both"], default="both")
    p.add_argument("--gate-mode", choices=["as-fitted", "soft", "hard"], default="as-fitted",
                   help="a prefill-gated calibrator's gate as fitted, or forced soft (ρ scales the update) or hard "
                   "(ρ rounded at 0.5): the ablation of --hard-gate on one fit")
    p.add_argument("--in-scope-push", type=finite(0.0), default=None, metavar="BETA",
                   help="override a prefill-gated calibrator's in-scope push (CrvlmConfig.in_scope_push) on this fit")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from crvlm_core.core.io import atomic_write_json
    from crvlm_core.evaluation import evaluate
    from crvlm_core.methods.loading import load_artifact
    from crvlm_core.metrics import scope_metrics
    from crvlm_core.models.loading import load_model

    in_scope = [s.strip() for s in args.in_scope.split(",")]
    manifest = json.loads((Path(args.artifact) / "artifact.json").read_text())
    handle = load_model(manifest["model"]["spec"])
    loaded = load_artifact(args.artifact, handle)
    handle, ivs, system = loaded.handle, loaded.interventions, loaded.system
    gate = next((iv for iv in ivs if getattr(iv, "gate_layer", None) is not None and hasattr(iv, "calibrator")), None)
    if gate is not None and args.gate_mode != "as-fitted":
        gate.hard_gate = args.gate_mode == "hard"
    if args.in_scope_push is not None:
        if gate is None or gate.vector is None:
            print("measure_framing: --in-scope-push needs a prefill-gated CR-VLM artifact with its refusal vector",
                  file=sys.stderr)
            return 2
        gate.in_scope_push = args.in_scope_push
    report: dict = {"gate_mode": args.gate_mode if gate is None else ("hard" if gate.hard_gate else "soft"),
                    "artifact": args.artifact, "in_scope_push": getattr(gate, "in_scope_push", None),
                    "in_scope": in_scope, "judge": None if args.gate_only else args.judge,
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": {}}
    for part, sets in parts(in_scope).items():
        if args.part not in ("both", part):
            continue
        for kind, samples in sets.items():
            row: dict = {"n_in": sum(s.scope == "in" for s in samples), "n_out": sum(s.scope == "out" for s in samples)}
            if gate is not None:
                row["gate"] = gate_accuracy(handle, gate, samples)
            if not args.gate_only:
                result = evaluate(handle, samples, ivs, max_new_tokens=args.max_new_tokens, judge=args.judge,
                                  system=system, cache_dir=True)
                refused = [r["refused"] for r in result.rows]
                row.update(scope_metrics(refused, [s.scope for s in samples], ci=True))
                row["refused_ids"] = [r["id"] for r in result.rows if r["refused"]]
                row.update(in_scope_vs_unsteered(handle, samples, result.rows, args, system))
            report["parts"].setdefault(part, {})[kind] = row
            shown = {k: row[k] for k in ("refusal_rate_out", "over_refusal_in", "mb_score") if k in row}
            print(f"[framing] {part:8s} {kind:6s} gate {row.get('gate', {}).get('accuracy')} {shown}", flush=True)
    print(f"[framing] wrote {atomic_write_json(args.out, report)}")  # whole or not at all
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
