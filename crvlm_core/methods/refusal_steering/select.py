"""Layer selection of Refusal Steering: cross-fitted AUC / d′ / correlation of each layer's projection (refusals vs
compliance), the layer ranking, the ridge λ with the best d′, and the per-layer profile of the three methods."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from crvlm_core.methods.refusal_steering.directions import METHODS, fit_directions
from crvlm_core.vectors.estimators import mean_diff

__all__ = ["LAMBDA_GRID", "choose_lambda", "layer_profile", "layer_scores", "principal_directions_needed",
           "rank_layers"]

LAMBDA_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Relative ridge values c tried for rmd / wrmd (λ_l = c · tr(Σ_l) / d, the mean eigenvalue of Σ_l)."""


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random pos > score of a random neg), ties count ½."""
    return float(roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]))


def _dprime(pos: np.ndarray, neg: np.ndarray) -> float:
    var = (pos.var() * len(pos) + neg.var() * len(neg)) / max(len(pos) + len(neg), 1)
    return float((pos.mean() - neg.mean()) / math.sqrt(max(var, 1e-30)))


def _folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), k)


def layer_scores(method: str, pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float] | None = None,
                 neg_conf: Sequence[float] | None = None, lam_rel: float = 1.0, folds: int = 2,
                 seed: int = 0) -> dict[str, list[float]]:
    """How well the projection on each layer's direction separates refusals from compliance, cross-fitted.

    Both classes are cut into ``folds`` seeded folds; the direction is fitted without fold f and the held-out
    samples of fold f are projected on it. Per layer: ``auc`` (held-out AUC of the projection), ``dprime``
    ((mean_refuse − mean_comply)/pooled sd of the held-out projections, averaged over folds) and ``corr``
    (Pearson correlation of the held-out projection with the judge confidence; ±1 labels when none are given).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    n_p, n_n = pos.shape[0], neg.shape[0]
    if min(n_p, n_n) < folds:
        raise ValueError(f"cross-fitting needs >= {folds} samples per side, got {n_p} refusals / {n_n} compliant")
    cp = np.asarray(pos_conf if pos_conf is not None else np.ones(n_p), dtype=np.float64)
    cn = np.asarray(neg_conf if neg_conf is not None else -np.ones(n_n), dtype=np.float64)
    rng = np.random.default_rng(seed)
    fp, fn = _folds(n_p, folds, rng), _folds(n_n, folds, rng)
    n_layers = pos.shape[1]
    proj_p, proj_n = np.zeros((n_p, n_layers)), np.zeros((n_n, n_layers))
    dps = []
    for f in range(folds):
        tp = np.setdiff1d(np.arange(n_p), fp[f])
        tn = np.setdiff1d(np.arange(n_n), fn[f])
        v = fit_directions(method, pos[tp], neg[tn], cp[tp], cn[tn], lam_rel=lam_rel).double()
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        hp = torch.einsum("nld,ld->nl", pos[fp[f]].double(), v).numpy()
        hn = torch.einsum("nld,ld->nl", neg[fn[f]].double(), v).numpy()
        proj_p[fp[f]], proj_n[fn[f]] = hp, hn
        dps.append([_dprime(hp[:, l], hn[:, l]) for l in range(n_layers)])
    conf = np.concatenate([cp, cn])
    auc, corr = [], []
    for l in range(n_layers):
        auc.append(_auc(proj_p[:, l], proj_n[:, l]))
        x = np.concatenate([proj_p[:, l], proj_n[:, l]])
        corr.append(float(np.corrcoef(x, conf)[0, 1]) if x.std() > 0 and conf.std() > 0 else 0.0)
    return {"auc": auc, "dprime": list(np.mean(dps, axis=0)), "corr": corr}


def rank_layers(scores: dict[str, list[float]], k: int | None = None, min_layer: int = 0) -> list[int]:
    """Layers ordered best first by held-out AUC, ties broken by d′ (AUC saturates at 1 on separable data);
    only layers ≥ ``min_layer``; the first ``k`` if given."""
    n = len(scores["auc"])
    order = sorted(range(min_layer, n), key=lambda l: (-round(scores["auc"][l], 6), -scores["dprime"][l], l))
    return order[:k] if k is not None else order


def choose_lambda(method: str, pos: torch.Tensor, neg: torch.Tensor, layers: Sequence[int],
                  pos_conf: Sequence[float] | None = None, neg_conf: Sequence[float] | None = None,
                  grid: Sequence[float] = LAMBDA_GRID, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The relative ridge ``c`` (λ_l = c·tr(Σ_l)/d) with the best cross-fitted d′ averaged over ``layers``.

    Returns ``(best c, {c: mean d′})``. Only ``rmd`` / ``wrmd`` have a λ.
    """
    if method == "mean-diff":
        raise ValueError("mean-diff has no ridge λ to choose")
    if not grid:
        raise ValueError("empty λ grid")
    layers = list(layers)
    sub_p, sub_n = pos[:, layers], neg[:, layers]
    table = {}
    for c in grid:
        s = layer_scores(method, sub_p, sub_n, pos_conf, neg_conf, lam_rel=c, seed=seed)
        table[float(c)] = float(np.mean(s["dprime"]))
    best = max(table, key=lambda c: (table[c], c))
    return best, table


def principal_directions_needed(pos: torch.Tensor, neg: torch.Tensor, frac: float = 0.9) -> list[int]:
    """Per layer: how many principal directions of the activations (both classes pooled and centred on their
    common mean) are needed to carry ``frac`` of the squared norm of the mean difference μ_refuse − μ_comply.

    1 means refusal is the dominant direction of variation at that layer; large numbers mean the refusal signal
    is spread over many directions that also carry other variation (the paper's finding for deeper layers).
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    out = []
    for layer in range(pos.shape[1]):
        xp, xn = pos[:, layer].double(), neg[:, layer].double()
        delta = xp.mean(0) - xn.mean(0)
        pooled = torch.cat([xp, xn])
        _, s, vh = torch.linalg.svd(pooled - pooled.mean(0), full_matrices=False)
        keep = s > s.max() * 1e-10
        coef = (vh[keep] @ delta) ** 2  # energy of δ along each PC, by decreasing variance
        cum = torch.cumsum(coef, 0) / max(float(delta @ delta), 1e-30)
        hit = torch.nonzero(cum >= frac - 1e-9)
        out.append(int(hit[0]) + 1 if len(hit) else int(keep.sum()))
    return out


def layer_profile(pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float], neg_conf: Sequence[float],
                  lam_rel: dict[str, float], seed: int = 0) -> dict:
    """Per layer and method: cross-fitted AUC / d′ / correlation, the mean-difference norm, and the number of
    principal directions (of the pooled activations) carrying 90 % of the mean difference."""
    prof: dict = {"layer": list(range(pos.shape[1])),
                  "mean_diff_norm": [float(x) for x in mean_diff(pos, neg).norm(dim=-1)],
                  "pcs_for_90pct": principal_directions_needed(pos, neg, 0.9)}
    for m in METHODS:
        s = layer_scores(m, pos, neg, pos_conf, neg_conf, lam_rel=lam_rel.get(m, 1.0), seed=seed)
        for k, v in s.items():
            prof[f"{m}_{k}"] = [float(x) for x in v]
    return prof
