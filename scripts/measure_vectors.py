"""Measure refusal vectors (each method × layer × strength) on a model with scope "biology in, rest out":
refusal rate on out-of-scope and over-refusal on in-scope test prompts, judged by the keyword rule.
Writes outputs/measurements/vectors_<model>.json; the README's vector table comes from these files.

    .venv/bin/python scripts/measure_vectors.py --model qwen2.5-0.5b
"""

import argparse
import time

import torch

from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.core.io import atomic_write_json
from crvlm_core.models.loading import load_model
from crvlm_core.core.paths import outputs_dir
from crvlm_core.methods.refusal_vectors import METHODS, fit_vector
from crvlm_core.evaluation import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layers", default=None, help="comma list (default: n/6, n/3, n/2, 2n/3)")
    ap.add_argument("--alphas", default="0.5,1,2")
    ap.add_argument("--n-train", type=int, default=32, help="per scope")
    ap.add_argument("--n-test", type=int, default=16, help="per scope")
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    h = load_model(args.model)
    n = h.n_layers
    layers = [int(x) for x in args.layers.split(",")] if args.layers else sorted({n // 6, n // 3, n // 2, 2 * n // 3})
    alphas = [float(a) for a in args.alphas.split(",")]
    samples = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    train, test = split(samples, n_train=args.n_train, n_test=args.n_test, seed=42)
    result = {"model": args.model, "layers": layers, "alphas": alphas, "n_train_per_scope": args.n_train,
              "n_test_per_scope": args.n_test, "judge": "keyword", "max_new_tokens": args.max_new_tokens, "methods": {}}
    path = outputs_dir() / "measurements" / f"vectors_{args.model}{'_' + args.tag if args.tag else ''}.json"
    for method in args.methods.split(","):
        t = time.perf_counter()
        vec = fit_vector(h, train, method, progress=False)
        fit_s = time.perf_counter() - t
        rows = sweep(h, vec, test, layers, alphas, max_new_tokens=args.max_new_tokens,
                     progress=lambda r: print(method, r["layer"], r["alpha"], "R=%.2f ORR=%.2f MB=%.2f" % (
                         r["refusal_rate_out"], r["over_refusal_in"], r["mb_score"]), "|", r["example_out"][:60], flush=True))
        best = max(rows, key=lambda r: (r["mb_score"], r["refusal_rate_out"]))
        result["methods"][method] = {"fit_seconds": fit_s, "rows": rows, "best": best}
        atomic_write_json(path, result)
    print("wrote", path)


if __name__ == "__main__":
    main()
