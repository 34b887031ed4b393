"""How well a judge agrees with human refusal labels: accuracy, Cohen's κ and ROC AUC (scikit-learn) on labelled
samples, and a named judge's cached agreement on the held-out part of ``refusal_labels`` (the README's table)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from crvlm_core.core.cache import cached_json, key_digest
from crvlm_core.core.io import nan_to_none
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import fingerprint
from crvlm_core.judges.base import Judge
from crvlm_core.judges.learned import LEARNED_FORMAT, split_labelled
from crvlm_core.judges.registry import DEFAULT_JUDGE, get_judge

__all__ = ["agreement_intervals", "calibrate_threshold", "judge_validation", "validate_judge"]


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


def calibrate_threshold(confidences: Sequence[float], labels: Sequence[bool]) -> float:
    """The cutoff on confidence (``refused = c > cutoff``) with the highest accuracy on these labels (call it on
    training labels only): a midpoint between adjacent confidences; among equally accurate cutoffs the one closest
    to 0."""
    import numpy as np

    c = np.asarray(confidences, dtype=float)
    y = np.asarray([bool(v) for v in labels])
    u = np.unique(c)
    if len(u) == 0 or len(u) != len(u[np.isfinite(u)]):
        raise ValueError("calibrate_threshold needs finite confidences")
    cuts = np.concatenate([[u[0] - 1e-6], (u[:-1] + u[1:]) / 2, [u[-1]]])
    acc = np.array([((c > t) == y).mean() for t in cuts])
    best = cuts[acc == acc.max()]
    return float(best[np.argmin(np.abs(best))])


def agreement_intervals(labels: Sequence[bool], verdicts: Sequence[bool], confidences: Sequence[float | None] | None = None,
                        level: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Percentile bootstrap intervals (``scipy.stats.bootstrap``, items resampled with replacement) of accuracy,
    Cohen's κ and, for graded verdicts, ROC AUC: ``{"accuracy": [lo, hi], "cohen_kappa": …, "roc_auc": …}``; ``None``
    for a bound that cannot be computed (e.g. resamples holding one class only)."""
    import numpy as np
    from scipy.stats import bootstrap, rankdata

    y, p = np.asarray(labels, dtype=bool), np.asarray(verdicts, dtype=bool)

    def kappa(i):  # Cohen's κ = (pₒ − pₑ)/(1 − pₑ), as sklearn's; 1 when both raters are constant and agree
        po = (y[i] == p[i]).mean()
        pe = y[i].mean() * p[i].mean() + (1 - y[i].mean()) * (1 - p[i].mean())
        return 1.0 if pe == 1 else (po - pe) / (1 - pe)

    def auc(i):  # Mann–Whitney U / (n₁·n₀), ties counted half, as sklearn's roc_auc_score
        n1 = y[i].sum()
        n0 = len(i) - n1
        return (rankdata(c[i])[y[i]].sum() - n1 * (n1 + 1) / 2) / (n1 * n0) if n1 and n0 else np.nan

    metrics = {"accuracy": lambda i: (y[i] == p[i]).mean(), "cohen_kappa": kappa}
    if confidences is not None and all(v is not None for v in confidences) and len(set(y)) == 2:
        c = np.asarray(confidences, dtype=float)
        metrics["roc_auc"] = auc
    out = {}
    for name, fn in metrics.items():
        res = bootstrap((np.arange(len(y)),), fn, vectorized=False, n_resamples=n_resamples, confidence_level=level,
                        method="percentile", random_state=seed)
        out[name] = [nan_to_none(float(res.confidence_interval.low)), nan_to_none(float(res.confidence_interval.high))]
    return out


def judge_validation(name: str = DEFAULT_JUDGE, seed: int = 0,
                     cache_dir: bool | str | os.PathLike | None = True) -> dict:
    """A named judge's agreement with the human labels on the seeded held-out 30 % of ``refusal_labels`` (the part
    the learned judge does not train on; the README's table): ``{"accuracy", "kappa", "n", "roc_auc"?, "labels"}``.
    Computed once and cached (``cache_dir``: True → ``outputs/cache/``, a path, or None/False for none; the key
    covers the labels and, for the learned judge, its training fingerprint; for ``llm`` its model, prompt and
    cutoff; for ``llm-probe`` its readout)."""
    _, test = split_labelled(load_dataset("refusal_labels"), 0.7, seed)
    judge = get_judge(name)
    ident = {"name": name, "seed": seed, "labels": fingerprint(test), "format": LEARNED_FORMAT,
             "judge": getattr(judge, "info", {}).get("fingerprint") if name == "learned" else None}
    if name == "llm":  # the judge model, prompt, answers and cutoff (a 0.5B entry must not stand in for the 1.5B)
        ident["llm"] = {k: str(getattr(judge, k, None)) for k in ("template", "answers", "threshold", "samples",
                                                                   "max_response_chars")}
        ident["llm"]["backend"] = getattr(judge.backend, "name", None)
    if name == "llm-probe":  # the readout, its layer, prompt and model
        ident["probe"] = key_digest(judge.to_dict())

    def compute() -> dict:
        r = validate_judge(judge, test)
        out = {"accuracy": nan_to_none(r["accuracy"]), "kappa": nan_to_none(r["cohen_kappa"]), "n": r["n"],
               "labels": f"refusal_labels, seeded held-out 30 % (seed {seed})"}
        if "roc_auc" in r:
            out["roc_auc"] = r["roc_auc"]
        return out

    return cached_json(cache_dir, f"judge-validation-{name}", ident, compute)
