"""Ridge-type steering-vector estimators: per-layer ridge regression on per-sample targets and the ridge-regularised
(weighted) mean difference ``(Σ + λI)⁻¹ (μ_pos − μ_neg)`` of Refusal Steering.

Ridge-type directions live in a "whitened" scale, not the activation scale; they are returned rescaled per layer to
the norm of the matching difference in means (``rescale=True``), so that a steering strength ``α = 1`` means
"mean-difference strength" for every method. Internally everything is computed in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from crvlm_core.vectors.checks import check_acts, check_lam, check_pair, check_weights
from crvlm_core.vectors.linalg import TINY, rescale_to, thin_svd, weighted_mean

__all__ = ["ridge_direction", "rmd", "wrmd"]


def _split_reference(acts: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
    """Mean activation of high-target minus low-target samples (split at the target range's midpoint)."""
    mid = (targets.max() + targets.min()) / 2
    hi, lo = targets > mid, targets < mid
    w_hi = None if weights is None else weights[hi]
    w_lo = None if weights is None else weights[lo]
    if (w_hi is not None and w_hi.sum() <= 0) or (w_lo is not None and w_lo.sum() <= 0):
        raise ValueError("cannot rescale: one side of the target split has zero total weight")
    return weighted_mean(acts[hi], w_hi) - weighted_mean(acts[lo], w_lo)


def ridge_direction(
    acts: Tensor,
    targets: Tensor,
    lam: float,
    weights: Tensor | None = None,
    rescale: bool = True,
) -> Tensor:
    """Per-layer ridge regression of per-sample targets on activations, with an intercept.

    At each layer, with ``X`` ``[n, d]``, targets ``y`` ``[n]`` and ``W = diag(weights)`` (identity when
    ``weights`` is None), centre ``X`` and ``y`` on their (weighted) means and solve::

        w = (Xcᵀ W Xc + λ I)⁻¹ Xcᵀ W yc

    — the coefficients of ``sklearn.linear_model.Ridge(alpha=λ).fit(X, y, sample_weight=weights)``
    (λ is *not* divided by ``n``, and scaling all weights by ``c`` is the same as dividing λ by ``c``).
    With ``X̃ = W^½ Xc`` and ``ỹ = W^½ yc`` this is ``(X̃ᵀX̃ + λI)⁻¹ X̃ᵀỹ``. When ``n ≤ d`` the
    equivalent dual form ``w = X̃ᵀ (X̃X̃ᵀ + λ I_n)⁻¹ ỹ`` is solved (push-through identity; an ``n × n``
    system, fast for few samples in a wide residual stream), otherwise the ``d × d`` primal system.
    With ``λ = 0`` the system is singular whenever ``n ≤ d`` (centring removes a rank) or features are
    collinear, so ``λ = 0`` always uses the pseudo-inverse (thin SVD, singular values below
    ``max(n, d) · eps · s_max`` dropped): the minimum-norm least-squares solution, which is OLS when
    the problem is well posed.

    Args:
        acts: ``[n, n_layers, d]``.
        targets: ``[n]``, e.g. refusal labels in {0, 1} or judge confidences in [−1, 1]; larger means
            "more refusal", so the direction points towards refusal.
        lam: Ridge penalty ``λ ≥ 0``.
        weights: Optional ``[n]`` non-negative sample weights.
        rescale: If True (default), rescale each layer (:func:`rescale_to`) to the norm of the
            reference difference in means: the (weighted) mean activation of samples whose target is
            above the midpoint of the target range, ``(max y + min y) / 2``, minus that of samples
            below it (samples exactly at the midpoint are left out). For {0, 1} labels that is exactly
            ``μ_1 − μ_0``; for confidences in [−1, 1] it is "confident refusal minus confident
            compliance". If False, return the raw ridge coefficients.

    Returns:
        ``[n_layers, d]`` float32.

    Raises:
        ValueError: On empty/NaN inputs, ``λ < 0``, a targets/weights length that is not ``n``, negative
            or all-zero weights, or constant targets.
    """
    acts = check_acts("acts", acts)
    lam = check_lam(lam)
    n, n_layers, d = acts.shape
    y = torch.as_tensor(targets).detach().to(torch.float64).flatten().to(acts.device)
    if y.numel() != n:
        raise ValueError(f"targets must have {n} entries (one per sample), got {y.numel()}")
    if not torch.isfinite(y).all():
        raise ValueError("targets contains NaN or inf")
    w = check_weights("weights", weights, n)
    if w is not None:
        w = w.to(acts.device)
    if y.max() == y.min():
        raise ValueError("targets are constant; the regression direction is undefined")
    sqrt_w = None if w is None else w.sqrt()
    yc = y - weighted_mean(y, w)
    y_t = yc if sqrt_w is None else sqrt_w * yc
    out = torch.empty((n_layers, d), dtype=torch.float64, device=acts.device)
    for layer in range(n_layers):
        x = acts[:, layer].to(torch.float64)
        xc = x - weighted_mean(x, w)
        x_t = xc if sqrt_w is None else sqrt_w[:, None] * xc
        if lam > 0 and n <= d:  # dual form: n × n system
            a = x_t @ x_t.T + lam * torch.eye(n, dtype=torch.float64, device=x.device)
            out[layer] = x_t.T @ torch.linalg.solve(a, y_t)
        elif lam > 0:  # primal form: d × d system
            a = x_t.T @ x_t + lam * torch.eye(d, dtype=torch.float64, device=x.device)
            out[layer] = torch.linalg.solve(a, x_t.T @ y_t)
        else:  # λ = 0: minimum-norm least squares through the pseudo-inverse
            p, s, qh = thin_svd(x_t)
            tol = max(n, d) * torch.finfo(torch.float64).eps * s.max()
            gain = torch.where(s > tol, 1.0 / s.clamp_min(TINY), torch.zeros_like(s))
            out[layer] = qh.T @ (gain * (p.T @ y_t))
    if rescale:
        out = rescale_to(out, _split_reference(acts, y, w)).to(torch.float64)
    return out.to(torch.float32)


def rmd(
    pos: Tensor,
    neg: Tensor,
    lam: float,
    pos_weights: Tensor | None = None,
    neg_weights: Tensor | None = None,
    rescale: bool = True,
) -> Tensor:
    """Ridge-regularised mean difference (Refusal Steering, arXiv 2512.16602), per layer.

    ::

        μ_c = Σ_{i∈c} w_i x_i / Σ_{i∈c} w_i                    (c ∈ {pos, neg})
        Σ   = Σ_c Σ_{i∈c} w_i (x_i − μ_c)(x_i − μ_c)ᵀ / Σ_i w_i   (pooled within-class covariance)
        v   = (Σ + λ I)⁻¹ (μ_pos − μ_neg)

    with ``w_i = 1`` when no weights are given. The pooled covariance is divided by the total weight
    (the maximum-likelihood normaliser, ``N`` when unweighted) rather than ``N − 2``: with fractional
    weights ``N − 2`` has no meaning, and the difference is only a rescaling of λ by ``N/(N−2)``.
    Because of that normaliser the estimator is invariant to multiplying *all* weights by one constant;
    weights that are all equal give exactly the unweighted result (they are treated as no weights).

    As λ → ∞, ``λ v → μ_pos − μ_neg``: the direction tends to the difference in means. With λ = 0 it is
    the LDA direction ``Σ⁻¹ (μ_pos − μ_neg)``; when Σ is singular (``N − 2 < d`` or collinear
    features) the pseudo-inverse is used (minimum-norm solution). With the weighted, class-centred data
    ``U = [√(w_i / Σw) (x_i − μ_c)]_i`` (``N × d``, ``Σ = UᵀU``), ``N ≥ d`` solves the ``d × d`` system
    directly and ``N < d`` uses Woodbury, ``v = (δ − Uᵀ (UUᵀ + λ I_N)⁻¹ U δ) / λ``, so no ``d × d``
    matrix is formed. (For λ tiny relative to the largest eigenvalue of Σ the Woodbury form loses
    precision; use λ = 0 for the plain LDA direction.)

    Args:
        pos: ``[n_pos, n_layers, d]``.
        neg: ``[n_neg, n_layers, d]``.
        lam: Ridge penalty ``λ ≥ 0``, on the covariance scale (activation units squared).
        pos_weights: Optional ``[n_pos]`` non-negative weights.
        neg_weights: Optional ``[n_neg]`` non-negative weights.
        rescale: If True (default), rescale each layer to the norm of the (weighted) difference in
            means ``μ_pos − μ_neg`` (see :func:`rescale_to`); if False, return ``v`` as defined above.

    Returns:
        ``[n_layers, d]`` float32.

    Raises:
        ValueError: On empty/NaN inputs, mismatched ``n_layers``/``d``, ``λ < 0``, or invalid weights.
    """
    pos, neg = check_pair(pos, neg)
    lam = check_lam(lam)
    wp = check_weights("pos_weights", pos_weights, pos.shape[0])
    wn = check_weights("neg_weights", neg_weights, neg.shape[0])
    if wp is not None or wn is not None:
        wp = torch.ones(pos.shape[0], dtype=torch.float64) if wp is None else wp
        wn = torch.ones(neg.shape[0], dtype=torch.float64) if wn is None else wn
        all_w = torch.cat([wp, wn])
        if bool((all_w == all_w[0]).all()):
            wp = wn = None  # a common scale cancels: identical to the unweighted estimator
        else:
            wp, wn = wp.to(pos.device), wn.to(pos.device)
    total = (pos.shape[0] + neg.shape[0]) if wp is None else float(wp.sum() + wn.sum())
    n_layers, d = pos.shape[1:]
    out = torch.empty((n_layers, d), dtype=torch.float64, device=pos.device)
    ref = torch.empty_like(out)
    for layer in range(n_layers):
        xp, xn = pos[:, layer].to(torch.float64), neg[:, layer].to(torch.float64)
        mp, mn = weighted_mean(xp, wp), weighted_mean(xn, wn)
        delta = mp - mn
        ref[layer] = delta
        cp, cn = xp - mp, xn - mn
        if wp is not None:
            cp, cn = wp.sqrt()[:, None] * cp, wn.sqrt()[:, None] * cn
        u = torch.cat([cp, cn]) / math.sqrt(total)  # [N, d], Σ = uᵀu
        if lam > 0 and u.shape[0] < d:  # Woodbury: (uᵀu + λI)⁻¹ = (I − uᵀ(uuᵀ + λI)⁻¹u) / λ
            a = u @ u.T + lam * torch.eye(u.shape[0], dtype=torch.float64, device=u.device)
            v = (delta - u.T @ torch.linalg.solve(a, u @ delta)) / lam
        elif lam > 0:
            v = torch.linalg.solve(u.T @ u + lam * torch.eye(d, dtype=torch.float64, device=u.device), delta)
        else:  # λ = 0: pseudo-inverse of Σ (minimum-norm solution when Σ is singular)
            _, s, qh = thin_svd(u)
            s2 = s * s
            tol = max(u.shape) * torch.finfo(torch.float64).eps * s2.max()
            inv = torch.where(s2 > tol, 1.0 / s2.clamp_min(TINY), torch.zeros_like(s2))
            v = qh.T @ (inv * (qh @ delta))
        out[layer] = v
    if rescale:
        return rescale_to(out, ref)
    return out.to(torch.float32)


def wrmd(
    pos: Tensor, neg: Tensor, pos_conf: Tensor, neg_conf: Tensor, lam: float, rescale: bool = True
) -> Tensor:
    """Weighted ridge-regularised mean difference: :func:`rmd` with confidence-magnitude weights.

    Each sample is weighted by ``|confidence|`` of the judge's verdict (e.g. confidences in [−1, 1]),
    so uncertain samples pull less on both the class means and the pooled covariance.

    Args:
        pos: ``[n_pos, n_layers, d]``.
        neg: ``[n_neg, n_layers, d]``.
        pos_conf: ``[n_pos]`` judge confidences of the positive samples.
        neg_conf: ``[n_neg]`` judge confidences of the negative samples.
        lam: Ridge penalty ``λ ≥ 0``.
        rescale: See :func:`rmd`.

    Returns:
        ``[n_layers, d]`` float32.

    Raises:
        ValueError: As :func:`rmd`, and if a class has zero total confidence.
    """
    pos_conf = torch.as_tensor(pos_conf).detach().to(torch.float64)
    neg_conf = torch.as_tensor(neg_conf).detach().to(torch.float64)
    return rmd(pos, neg, lam, pos_weights=pos_conf.abs(), neg_weights=neg_conf.abs(), rescale=rescale)
