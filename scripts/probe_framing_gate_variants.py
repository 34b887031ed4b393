"""Framing gate variants (#25, exploratory, 7 Dec 2026): with framing augmentation (training templates, two copies),
logistic probes of other strengths and a one-hidden-layer MLP at layers 15, 20, 22, 23 of the default model; then the
same with the dev half of the plain questions (and their training-template framings) added to the training data, read
on the held-out half only. States come from the extraction cache that ``probe_framing_gate.py`` fills (layers 12-23).

    .venv/bin/python scripts/probe_framing_gate_variants.py > outputs/framing/probe-biology-variants.txt
"""
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.framing import framing_augment
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.extract import extract
from crvlm_core.models.loading import load_model
from measure_framing import parts
h = load_model("qwen2.5-0.5b")
layers = list(range(12, 24))
read = lambda s: extract(h, s, layers=layers, cache_dir=True, progress=False).acts.numpy()
train, _ = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=200, n_test=200, seed=42)
y = np.array([s.scope == "out" for s in train])
xp = read(train); xa = [read(framing_augment(train, ["biology"], seed=k)) for k in (1, 2)]
tests = {f"{p}/{k}": (read(ss), np.array([s.scope == "out" for s in ss])) for p, sets in parts(["biology"]).items() for k, ss in sets.items()}
X = np.concatenate([xp, *xa]); Y = np.concatenate([y, y, y])
for L in (15, 20, 22, 23):
    j = layers.index(L)
    for name, clf in [("lr C=1", LogisticRegression(C=1, max_iter=3000)), ("lr C=0.01", LogisticRegression(C=0.01, max_iter=3000)),
                      ("mlp", MLPClassifier((256,), alpha=1e-3, max_iter=500, random_state=0))]:
        m = make_pipeline(StandardScaler(), clf).fit(X[:, j], Y)
        print(L, name, {k: round(float((m.predict(xs[:, j]) == ys).mean()), 3) for k, (xs, ys) in tests.items()}, flush=True)
# concat all layers 14-23 lr
cols = [layers.index(l) for l in (15, 20, 23)]
m = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000)).fit(X[:, cols].reshape(len(X), -1), Y)
print("15+20+23 lr", {k: round(float((m.predict(xs[:, cols].reshape(len(xs), -1)) == ys).mean()), 3) for k, (xs, ys) in tests.items()})
print("--- + dev plain questions (and their train-template framings) in training; held-out only")
dev_plain = parts(["biology"])["dev"]["plain"]
yd = np.array([s.scope == "out" for s in dev_plain])
xd = read(dev_plain); xda = [read(framing_augment(dev_plain, ["biology"], seed=k)) for k in (1, 2)]
X2 = np.concatenate([X, xd, *xda]); Y2 = np.concatenate([Y, yd, yd, yd])
for L in (15, 22, 23):
    j = layers.index(L)
    for name, clf in [("lr C=0.01", LogisticRegression(C=0.01, max_iter=3000)), ("lr C=0.1", LogisticRegression(C=0.1, max_iter=3000)),
                      ("mlp", MLPClassifier((256,), alpha=1e-3, max_iter=500, random_state=0))]:
        m = make_pipeline(StandardScaler(), clf).fit(X2[:, j], Y2)
        print(L, name, {k: round(float((m.predict(xs[:, j]) == ys).mean()), 3) for k, (xs, ys) in tests.items() if k.startswith("held")}, flush=True)
