"""What makes a framing-robust scope gate hold (#25), measured on the dev half only: probes on the default model's
prefill-gate states (layer 22, last prompt token), trained as ``crvlm fit --gate-fit probe`` trains its gate, scored on
the dev half of ``plain_questions``, plain and framed (test templates). The held-out half is never read.

``--study ingredients``: the data of ``scripts/framing_scopes.sh``'s first robust fit (MMLU's train half 100 per
scope, ``plain_questions_train`` at most 100 per scope, one framed copy of each) with one ingredient at a time left
out — the in-style questions, the framed copies, the hidden layer (logistic regression instead of an MLP); accuracy.

``--study data``: MMLU + ``plain_questions_train`` at most CAP per scope (``--caps``) + one framed copy, logistic
probes with C 0.1 / 1, with and without class-balanced weights; the gate's R, over-refusal and MB (gate refuses ⇔
ρ > 0.5).

``--study copies``: the data of ``framing_scopes.sh``'s ``crvlm-robust`` fit (MMLU's train half + all of
``plain_questions_train``) with 0, 1 or 2 framed copies of each question, logistic probes (class-balanced, C 0.1 / 1),
and the probe on layers 8 and 22 side by side; the gate's R / over-refusal / MB. The training lists are
``fit_crvlm``'s own (:func:`~crvlm_core.methods.crvlm.steering.training_sets` with two copies), so a later
``crvlm fit --framing-augment 2`` reads its gate states from this study's cache.

States are read as the fit reads them (layers 8 and 22, the extraction cache).

    .venv/bin/python scripts/framing_gate_ablation.py --study data --scopes biology \\
        --out outputs/framing/gate-data-dev-biology.json
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


def gate_scores(pred: np.ndarray, out: np.ndarray) -> dict:
    """The gate's R (out of scope gated), over-refusal (in scope gated) and MB."""
    from crvlm_core.metrics import mb_score

    r, orr = float(pred[out].mean()), float(pred[~out].mean())
    return {"R": round(r, 3), "ORR": round(orr, 3), "MB": round(mb_score(r, orr), 3)}


def ingredients(scope, mmlu, in_style, states, label, tests) -> dict:
    """One ingredient left out at a time: accuracy per dev set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crvlm_core.data.framing import framing_augment

    extra = in_style(100)
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
    return rows


def data_curve(scope, mmlu, in_style, states, label, tests, caps) -> dict:
    """The gate against the amount of in-style data: R / ORR / MB per dev set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crvlm_core.data.framing import framing_augment

    rows = {}
    for cap in caps:
        base = mmlu + (in_style(cap) if cap else [])
        framed = [replace(f, id=f"{f.id}#0") for f in framing_augment(base, [scope], seed=42)]
        x, y = states(base + framed), label(base + framed)
        for weight in (None, "balanced"):
            for c in (0.1, 1.0):
                model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight=weight))
                model.fit(x, y)
                name = f"in-style ≤{cap}/scope, C={c}{', balanced' if weight else ''}"
                rows[name] = {"n_in": int((~y).sum()), "n_out": int(y.sum()),
                              **{k: gate_scores(model.predict(xs).astype(bool), ys) for k, (xs, ys) in tests.items()}}
                print(f"[gate-data] {scope:9s} {name:40s} {rows[name]}", flush=True)
    return rows


def copies_curve(scope, mmlu, in_style, read, gate, extract_states, tests) -> dict:
    """The gate against the number of framed copies (0, 1, 2) of every training question: R / ORR / MB per dev set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from crvlm_core.methods.crvlm.config import CrvlmConfig
    from crvlm_core.methods.crvlm.steering import training_sets

    inn, out = training_sets(mmlu + in_style(1500), CrvlmConfig(framing_augment=2))
    acts = np.concatenate([extract_states(inn), extract_states(out)])  # [n, len(read), d]
    y = np.array([False] * len(inn) + [True] * len(out))
    copy = np.array([int(s.id.rsplit("#", 1)[1]) + 1 if "#" in s.id else 0 for s in inn + out])
    rows = {}
    for n_copies, c, feats in ((0, 1.0, "22"), (1, 0.1, "22"), (1, 1.0, "22"), (2, 0.1, "22"), (2, 1.0, "22"),
                               (1, 1.0, "8+22"), (2, 1.0, "8+22")):
        cols = [read.index(gate)] if feats == "22" else list(range(len(read)))
        keep = copy <= n_copies
        x = acts[keep][:, cols].reshape(int(keep.sum()), -1)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight="balanced"))
        model.fit(x, y[keep])
        plural = "s" if "+" in feats else ""
        name = f"{n_copies} framed cop{'y' if n_copies == 1 else 'ies'}, C={c}, layer{plural} {feats}"
        rows[name] = {"n_in": int((~y[keep]).sum()), "n_out": int(y[keep].sum()),
                      **{k: gate_scores(model.predict(xs[:, cols].reshape(len(xs), -1)).astype(bool), ys)
                         for k, (xs, ys) in tests.items()}}
        print(f"[gate-copies] {scope:9s} {name:40s} {rows[name]}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", choices=["ingredients", "data", "copies"], default="ingredients")
    p.add_argument("--scopes", default="biology,physics,geography")
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--caps", default="0,100,200,1000", help="--study data: in-style questions per scope")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from crvlm_core.cli.inputs import scoped_data
    from crvlm_core.core.io import atomic_write_json
    from crvlm_core.data.framing import framing_parts
    from crvlm_core.extract import extract
    from crvlm_core.methods.crvlm.calibrated import default_gate_layer
    from crvlm_core.methods.refusal_vectors import default_layers
    from crvlm_core.models.loading import load_model

    warnings.simplefilter("ignore")
    handle = load_model(args.model)
    gate = default_gate_layer(handle)
    read = sorted(set(default_layers(handle)) | {gate})  # as fit_crvlm reads its training states: cache hits

    def extract_states(samples):  # [n, len(read), d]: the fit's call (layers, batch size), so the cache is shared
        return extract(handle, samples, layers=read, batch_size=8, progress="gate states").acts.numpy()

    def states(samples):
        return extract_states(samples)[:, read.index(gate)]

    def label(samples):
        return np.array([s.scope == "out" for s in samples])

    report = {"model": args.model, "study": args.study, "gate_layer": gate,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scopes": {}}
    for scope in args.scopes.split(","):
        mmlu = scoped_data("mmlu", [scope], [], "train", 100, 42, "mmlu")
        dev = framing_parts([scope])["dev"].items()
        tests = ({kind: (extract_states(rows), label(rows)) for kind, rows in dev} if args.study == "copies" else
                 {kind: (states(rows), label(rows)) for kind, rows in dev})

        def in_style(cap, scope=scope):
            return scoped_data("plain_questions_train", [scope], [], "all", cap, 42, "in-style")

        if args.study == "copies":
            report["scopes"][scope] = copies_curve(scope, mmlu, in_style, read, gate, extract_states, tests)
        elif args.study == "ingredients":
            report["scopes"][scope] = ingredients(scope, mmlu, in_style, states, label, tests)
        else:
            report["scopes"][scope] = data_curve(scope, mmlu, in_style, states, label, tests,
                                                 [int(c) for c in args.caps.split(",")])
    print(f"[{args.study}] wrote {atomic_write_json(args.out, report)}")  # whole or not at all
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
