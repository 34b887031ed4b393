"""Which gate features hold under framing (#25): a logistic probe (the shape of CR-VLM's prefill gate) on the default
model's states at the gate layer, trained on MMLU (200 + 200, notebook 03's split) with or without framing
augmentation (training templates), read at the last prompt token or averaged over the prompt's tokens; accuracy on the
project's plain questions and their framed versions (test templates), dev and held-out halves.

    .venv/bin/python scripts/probe_framing_gate.py --in-scope biology [--layer 22] --out outputs/framing/probe-biology.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def states(handle, samples, layer: int, pooling: str) -> np.ndarray:
    """``[n, d]`` states at ``layer``: the last prompt token, or the mean over the prompt's real tokens."""
    from crvlm_core.extract import _capture, prompt_batches

    out = torch.empty(len(samples), handle.hidden_size)
    for _, idx in prompt_batches(handle, [s.prompt for s in samples], [False] * len(samples), 8):
        enc = handle.build_inputs([samples[k].prompt for k in idx])
        mask = enc["attention_mask"].float().cpu()
        if pooling == "last":
            w = torch.zeros_like(mask)
            w[:, -1] = 1.0
        else:
            w = mask / mask.sum(1, keepdim=True)
        out[idx] = _capture(handle, enc, w, [layer])[:, 0]
    return out.numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--in-scope", required=True)
    p.add_argument("--layers", default="12-23", help="layers to probe, A-B (each alone, and the last two together)")
    p.add_argument("--pooling", choices=["last", "mean"], default="last",
                   help="mean was worse on biology (0.45-0.47 framed without augmentation): last is the default")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.framing import framing_augment
    from crvlm_core.data.splits import assign_scope, split
    from crvlm_core.extract import extract
    from crvlm_core.models.loading import load_model

    sys.path.insert(0, str(ROOT / "scripts"))
    from measure_framing import parts

    in_scope = [s.strip() for s in args.in_scope.split(",")]
    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    handle = load_model(args.model)
    train, _ = split(assign_scope(load_dataset("mmlu"), in_scope=in_scope), n_train=200, n_test=200, seed=42)

    def read(samples):
        if args.pooling == "last":  # cached: a rerun reads them back
            return extract(handle, samples, layers=layers, cache_dir=True, progress=False).acts.numpy()
        return np.stack([states(handle, samples, l, "mean") for l in layers], axis=1)

    y = np.array([s.scope == "out" for s in train])
    x_plain = read(train)
    x_aug = [read(framing_augment(train, in_scope, seed=k)) for k in (1, 2)]
    tests = {f"{part}/{kind}": (read(samples), np.array([s.scope == "out" for s in samples]))
             for part, sets in parts(in_scope).items() for kind, samples in sets.items()}
    variants = {"plain": (x_plain, y), "augmented x1": (np.concatenate([x_plain, x_aug[0]]), np.concatenate([y, y])),
                "augmented x2": (np.concatenate([x_plain, *x_aug]), np.concatenate([y, y, y]))}
    report = {"model": args.model, "in_scope": in_scope, "pooling": args.pooling, "n_train": len(train),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": {}}
    picks = [[j] for j in range(len(layers))] + [[len(layers) - 2, len(layers) - 1]]
    for variant, (x, yy) in variants.items():
        for cols in picks:
            name = "+".join(str(layers[j]) for j in cols)
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
            probe.fit(x[:, cols].reshape(len(x), -1), yy)
            row = {k: round(float((probe.predict(xs[:, cols].reshape(len(xs), -1)) == ys).mean()), 3)
                   for k, (xs, ys) in tests.items()}
            report["results"][f"{variant}/L{name}"] = row
            print(f"[probe] {variant:12s} L{name:6s} {row}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
