"""How well a judge agrees with human refusal labels: accuracy, Cohen's κ and ROC AUC (scikit-learn) on labelled
samples, and a named judge's cached agreement on the held-out part of ``refusal_labels`` (the README's table)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from crvlm_core.core.cache import cached_json
from crvlm_core.core.io import nan_to_none
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import fingerprint
from crvlm_core.judges.base import Judge
from crvlm_core.judges.learned import LEARNED_FORMAT, split_labelled
from crvlm_core.judges.registry import DEFAULT_JUDGE, get_judge

__all__ = ["judge_validation", "validate_judge"]


def validate_judge(judge: Judge, samples: Sequence, return_confidences: bool = False) -> dict:
    """Agreement with human labels (``extra["refused"]``, ``extra["response"]``): accuracy, Cohen's κ, n; for a
    graded judge also ``roc_auc`` of its confidence (threshold-free). ``return_confidences`` adds the per-sample
    confidences (``None`` for an ungraded judge)."""
    from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

    samples = list(samples)
    results = judge.judge([s.prompt for s in samples], [s.extra["response"] for s in samples])
    y = [bool(s.extra["refused"]) for s in samples]
    p = [r.refused for r in results]
    acc = float(accuracy_score(y, p)) if y else float("nan")
    kappa = float(cohen_kappa_score(y, p)) if len(set(y) | set(p)) > 1 else float("nan")
    out: dict[str, Any] = {"accuracy": acc, "cohen_kappa": kappa, "n": len(y)}
    conf = [r.confidence for r in results]
    if conf and all(c is not None for c in conf) and len(set(y)) == 2:
        out["roc_auc"] = float(roc_auc_score(y, conf))
    if return_confidences:
        out["confidences"] = conf
    return out


def judge_validation(name: str = DEFAULT_JUDGE, seed: int = 0,
                     cache_dir: bool | str | os.PathLike | None = True) -> dict:
    """A named judge's agreement with the human labels on the seeded held-out 30 % of ``refusal_labels`` (the part
    the learned judge does not train on; the README's table): ``{"accuracy", "kappa", "n", "roc_auc"?, "labels"}``.
    Computed once and cached (``cache_dir``: True → ``outputs/cache/``, a path, or None/False for none; the key
    covers the labels and, for the learned judge, its training fingerprint; for ``llm`` the default local judge
    model)."""
    _, test = split_labelled(load_dataset("refusal_labels"), 0.7, seed)
    judge = get_judge(name)
    ident = {"name": name, "seed": seed, "labels": fingerprint(test), "format": LEARNED_FORMAT,
             "judge": getattr(judge, "info", {}).get("fingerprint") if name == "learned" else None}

    def compute() -> dict:
        r = validate_judge(judge, test)
        out = {"accuracy": nan_to_none(r["accuracy"]), "kappa": nan_to_none(r["cohen_kappa"]), "n": r["n"],
               "labels": f"refusal_labels, seeded held-out 30 % (seed {seed})"}
        if "roc_auc" in r:
            out["roc_auc"] = r["roc_auc"]
        return out

    return cached_json(cache_dir, f"judge-validation-{name}", ident, compute)
