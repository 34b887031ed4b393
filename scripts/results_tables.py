"""Print the README's result tables (markdown) from a workbook run's metrics files.

    .venv/bin/python scripts/results_tables.py [--run default] [--extra-run smollm2]
"""

import argparse
import json

from crvlm_core.core.paths import outputs_dir


def _load(run: str, notebook: str) -> dict | None:
    path = outputs_dir() / run / notebook / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def vectors_table(m: dict) -> str:
    lines = [f"Refusal vectors on `{m['model']}` ({m['n_train_per_scope']} + {m['n_train_per_scope']} training, "
             f"{m['n_test_per_scope']} + {m['n_test_per_scope']} held-out questions, {m['judge']} judge, "
             f"{m['max_new_tokens']} new tokens):", "",
             "| vector | best MB at (layer, α) | R | ORR | MB | strongest R at (layer, α) | R | ORR |",
             "|---|---|---|---|---|---|---|---|"]
    for method, b in m["best"].items():
        s = m["strongest"][method]
        lines.append(f"| {method} | ({b['layer']}, {b['alpha']:g}) | {b['refusal_rate_out']:.2f} | {b['over_refusal_in']:.2f} "
                     f"| {b['mb_score']:.2f} | ({s['layer']}, {s['alpha']:g}) | {s['refusal_rate_out']:.2f} | "
                     f"{s['over_refusal_in']:.2f} |")
    return "\n".join(lines)


def crvlm_table(m: dict) -> str:
    lines = [f"CR-VLM on `{m['model']}`, layer(s) {m['layers']}, prefill gate at layer {m['gate_layer']} "
             f"({m['n_train_per_scope']} + {m['n_train_per_scope']} training, {m['n_test_per_scope']} + "
             f"{m['n_test_per_scope']} held-out questions, {m['judge']} judge, {m['max_new_tokens']} new tokens):", "",
             "| method | R (out-of-scope refusal) | ORR (in-scope over-refusal) | MB | tokens/s |", "|---|---|---|---|---|"]
    for row in m["table"]:
        lines.append(f"| {row['method']} | {row['refusal_rate_out']:.2f} | {row['over_refusal_in']:.2f} | "
                     f"{row['mb_score']:.2f} | {row['tokens_per_second']:.1f} |")
    gm = m.get("gate_mean", {})
    if gm:
        lines += ["", "Mean gate ρ on held-out questions (in / out): " + "; ".join(
            f"{n} {v['in']:.2f} / {v['out']:.2f}" for n, v in gm.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="default")
    ap.add_argument("--extra-run", action="append", default=[])
    args = ap.parse_args()
    for run in [args.run, *args.extra_run]:
        summary = outputs_dir() / run / "summary.json"
        if summary.exists():
            s = json.loads(summary.read_text())
            print(f"\n<!-- run {run}: " + ", ".join(f"{k}: {n.get('status')} "
                  f"{n.get('seconds', 0):.0f} s" for k, n in (s.get('notebooks') or {}).items()) + " -->")
        m1, m2 = _load(run, "01_refusal_vectors"), _load(run, "02_calibrator_training")
        if m1:
            print("\n" + vectors_table(m1))
        if m2:
            print("\n" + crvlm_table(m2))


if __name__ == "__main__":
    main()
