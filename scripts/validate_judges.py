"""Validate the refusal judges against the 169 human labels of ``refusal_labels``: accuracy and Cohen's κ on the
seeded held-out 30 % (the learned judge trains on the other 70 %). Writes outputs/measurements/judges.json and
prints a markdown table.

    python scripts/validate_judges.py [--llm-model qwen2.5-0.5b] [--batch-size 8] [--llm-all] [--no-llm]
"""

from __future__ import annotations

import argparse
import platform
import time

from crvlm_core.data.schema import fingerprint
from crvlm_core.data.bundled import load_dataset
from crvlm_core.core.io import atomic_write_json
from crvlm_core.judges.registry import DEFAULT_JUDGE, get_judge
from crvlm_core.judges.keyword import KeywordJudge
from crvlm_core.judges.learned import LearnedJudge, split_labelled
from crvlm_core.judges.validation import validate_judge
from crvlm_core.core.paths import outputs_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm-model", default="qwen2.5-0.5b", help="model spec of the local LLM judge")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llm-all", action="store_true", help="also run the LLM judge on all 169 labels")
    ap.add_argument("--no-llm", action="store_true")
    ap.add_argument("--out", default=str(outputs_dir() / "measurements" / "judges.json"))
    args = ap.parse_args()

    samples = load_dataset("refusal_labels")
    train, test = split_labelled(samples, 0.7, args.seed)
    rows = []

    def run(name: str, judge, subset: list, split: str, **extra) -> None:
        t0 = time.perf_counter()
        r = validate_judge(judge, subset, return_confidences=True)
        r.update(judge=name, split=split, seconds=round(time.perf_counter() - t0, 2), **extra)
        r["sample_ids"] = [s.id for s in subset]
        rows.append(r)
        print(f"  {name:8s} {split:14s} acc={r['accuracy']:.3f} κ={r['cohen_kappa']:.3f} "
              f"AUC={r.get('roc_auc', float('nan')):.3f} n={r['n']} ({r['seconds']} s)",
              flush=True)

    run("keyword", KeywordJudge(), test, "held-out 30%")
    run("keyword", KeywordJudge(), samples, "all")
    learned = LearnedJudge.from_labels(samples, train_frac=0.7, seed=args.seed)
    assert set(learned.info["test_ids"]) == {s.id for s in test}
    run("learned", learned, test, "held-out 30%", fingerprint=learned.info["fingerprint"],
        n_train=learned.info["n_train"], n_synthetic=learned.info["synthetic"])
    if not args.no_llm:
        llm = get_judge("llm", model=args.llm_model, batch_size=args.batch_size)
        run("llm", llm, test, "held-out 30%", judge_model=args.llm_model)
        if args.llm_all:
            run("llm", llm, samples, "all", judge_model=args.llm_model)

    atomic_write_json(args.out, {
        "dataset": "refusal_labels", "dataset_fingerprint": fingerprint(samples), "split_seed": args.seed,
        "n_train": len(train), "n_test": len(test), "test_ids": [s.id for s in test], "default_judge": DEFAULT_JUDGE,
        "machine": platform.platform(), "results": rows,
    })
    print(f"\nwrote {args.out}\n")
    print("| judge | split | accuracy | Cohen's κ | ROC AUC of confidence | n | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        label = r["judge"] + (f" ({r['judge_model']})" if "judge_model" in r else "")
        auc = f"{r['roc_auc']:.3f}" if "roc_auc" in r else "—"
        print(f"| {label} | {r['split']} | {r['accuracy']:.3f} | {r['cohen_kappa']:.3f} | {auc} | {r['n']} | {r['seconds']} |")


if __name__ == "__main__":
    main()
