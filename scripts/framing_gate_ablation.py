"""What makes a scope gate hold under framing (#25), measured on the dev half only: probes on the default model's
prefill-gate states (layer 22, last prompt token), trained on the data of ``scripts/framing_scopes.sh``'s
``crvlm-robust`` fit with one ingredient at a time left out — the in-style questions (``plain_questions_train``), the
framed copies (training templates), the hidden layer (logistic regression instead of an MLP) — and scored on the dev
half of ``plain_questions``, plain and framed (test templates). States are read exactly as the fit reads them (layers
8 and 22, the extraction cache), so after the fits this script only reads the dev questions.

    .venv/bin/python scripts/framing_gate_ablation.py --scopes biology,physics,geography \\
        --out outputs/framing/gate-ablation-dev.json
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scopes", default="biology,physics,geography")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crvlm_core.cli.inputs import scoped_data
    from crvlm_core.core.io import atomic_write_json
    from crvlm_core.data.framing import framing_augment, framing_parts
    from crvlm_core.extract import extract
    from crvlm_core.methods.crvlm.calibrated import default_gate_layer
    from crvlm_core.methods.refusal_vectors import default_layers
    from crvlm_core.models.loading import load_model

    warnings.simplefilter("ignore")
    handle = load_model(args.model)
    gate = default_gate_layer(handle)
    read = sorted(set(default_layers(handle)) | {gate})  # as fit_crvlm reads its training states: cache hits

    def states(samples):
        acts = extract(handle, samples, layers=read, batch_size=8, progress=False).acts
        return acts[:, read.index(gate)].numpy()

    def label(samples):
        return np.array([s.scope == "out" for s in samples])

    report = {"model": args.model, "gate_layer": gate, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "scopes": {}}
    for scope in args.scopes.split(","):
        mmlu = scoped_data("mmlu", [scope], [], "train", 100, 42, "mmlu")
        extra = scoped_data("plain_questions_train", [scope], [], "all", 100, 42, "in-style")
        dev = framing_parts([scope])["dev"]
        tests = {kind: (states(rows), label(rows)) for kind, rows in dev.items()}
        rows = {}
        for use_extra in (True, False):
            for copies in (1, 0):
                base = mmlu + extra if use_extra else mmlu
                framed = [replace(f, id=f"{f.id}#0") for f in framing_augment(base, [scope], seed=42)] if copies else []
                x, y = states(base + framed), label(base + framed)
                for gate_kind, clf in (("mlp", MLPClassifier((256,), alpha=1e-3, max_iter=500, random_state=0)),
                                       ("linear", LogisticRegression(C=1.0, max_iter=3000))):
                    model = make_pipeline(StandardScaler(), clf).fit(x, y)
                    data = ("in-style + " if use_extra else "") + "MMLU"
                    name = f"{data}, {copies} framed cop{'y' if copies == 1 else 'ies'}, {gate_kind}"
                    rows[name] = {k: round(float((model.predict(xs) == ys).mean()), 3) for k, (xs, ys) in tests.items()}
                    print(f"[ablation] {scope:9s} {name:45s} {rows[name]}", flush=True)
        report["scopes"][scope] = rows
    print(f"[ablation] wrote {atomic_write_json(args.out, report)}")  # whole or not at all
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
