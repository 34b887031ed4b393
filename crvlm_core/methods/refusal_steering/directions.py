"""Per-layer refusal directions of Refusal Steering: mean-diff, rmd and wrmd (confidence-weighted rmd) with the
relative ridge λ_l = c·tr(Σ_l)/d, ridge directions rescaled to the mean-difference norm."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from crvlm_core.vectors.checks import check_lam
from crvlm_core.vectors.estimators import mean_diff
from crvlm_core.vectors.ridge import rmd, wrmd

__all__ = ["METHODS", "fit_directions", "relative_lambda"]

METHODS = ("mean-diff", "rmd", "wrmd")
"""Vector estimators of Refusal Steering (see :mod:`crvlm_core.vectors.estimators`)."""


def relative_lambda(pos: torch.Tensor, neg: torch.Tensor, c: float) -> list[float]:
    """Per-layer ridge λ_l = c · tr(Σ_l) / d, with Σ_l the pooled within-class covariance (ML normaliser), i.e. ``c``
    times its mean eigenvalue: the same ``c`` means the same relative shrinkage at every layer."""
    c = float(c)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"the relative ridge c (λ = c·tr(Σ)/d) must be a finite number >= 0, got {c}")
    out = []
    n = pos.shape[0] + neg.shape[0]
    for layer in range(pos.shape[1]):
        xp, xn = pos[:, layer].double(), neg[:, layer].double()
        ss = ((xp - xp.mean(0)) ** 2).sum() + ((xn - xn.mean(0)) ** 2).sum()
        out.append(c * float(ss) / n / pos.shape[2])
    return out


def fit_directions(method: str, pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float] | None = None,
                   neg_conf: Sequence[float] | None = None, lam_rel: float = 1.0,
                   lam: float | None = None) -> torch.Tensor:
    """Per-layer direction ``[n_layers, d]`` pointing towards refusal.

    ``mean-diff``: μ_refuse − μ_comply. ``rmd``: (Σ + λ_l I)⁻¹(μ_refuse − μ_comply)
    (:func:`crvlm_core.vectors.ridge.rmd`). ``wrmd``: the same with every sample weighted by |judge confidence|
    (:func:`crvlm_core.vectors.ridge.wrmd`). The ridge directions are rescaled per layer to the mean-difference
    norm. ``lam`` (absolute, every layer) overrides ``lam_rel`` (relative: λ_l = lam_rel · tr(Σ_l)/d).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mean-diff":
        return mean_diff(pos, neg)
    if method == "wrmd" and (pos_conf is None or neg_conf is None):
        raise ValueError("wrmd needs the judge confidences of both sides (pos_conf, neg_conf)")
    lams = [check_lam(lam)] * pos.shape[1] if lam is not None else relative_lambda(pos, neg, lam_rel)
    out = []
    for layer, lam_l in enumerate(lams):
        p, n = pos[:, layer:layer + 1], neg[:, layer:layer + 1]
        if method == "rmd":
            out.append(rmd(p, n, lam_l))
        else:
            out.append(wrmd(p, n, torch.as_tensor(pos_conf), torch.as_tensor(neg_conf), lam_l))
    return torch.cat(out)
