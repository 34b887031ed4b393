"""Steering-vector estimators over cached activations, and the saved :class:`SteeringVector` artifact.

Every estimator maps activations ``[n_samples, n_layers, d]`` to one direction per layer ``[n_layers, d]``
(float32) for *all* layers given; choosing the layers a vector is applied at is a later step.

Estimators (per layer ``l``; ``x_i`` is a sample's activation at that layer):

* :func:`mean_diff` — ``μ_pos − μ_neg`` (difference in means, as in andyrdt/refusal_direction).
  :func:`teacher_forced_mean_diff` (CR-VLM) and :func:`prompt_based` (persona baseline) are the same
  arithmetic under the names of the protocols that produce their inputs.
* :func:`pca_direction` — first principal component of the centred *paired* differences ``pos_i − neg_i``.
* :func:`ridge_direction` — ridge regression of per-sample targets on activations, with intercept.
* :func:`rmd` / :func:`wrmd` — ridge-regularised (weighted) mean difference ``(Σ + λI)⁻¹ (μ_pos − μ_neg)``.

Ridge-type directions live in a "whitened" scale, not the activation scale; they are returned rescaled
per layer to the norm of the matching difference in means (``rescale=True``), so that a steering strength
``α = 1`` means "mean-difference strength" for every method. Internally everything is computed in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from crvlm_core.core.io import atomic_save_safetensors, atomic_write_json, sha256_hex

__all__ = [
    "FORMAT_VERSION",
    "OPERATIONS",
    "SteeringVector",
    "VECTOR_JSON",
    "VECTOR_SAFETENSORS",
    "mean_diff",
    "normalize",
    "pca_direction",
    "prompt_based",
    "rescale_to",
    "ridge_direction",
    "rmd",
    "teacher_forced_mean_diff",
    "wrmd",
]

VECTOR_SAFETENSORS = "vector.safetensors"
"""File name of the directions tensor inside a saved vector's directory."""
VECTOR_JSON = "vector.json"
"""File name of the metadata (every field but the tensor) inside a saved vector's directory."""
FORMAT_VERSION = 1
"""Version of the on-disk vector format written by :meth:`SteeringVector.save`."""
OPERATIONS = ("add", "project_out")
"""Allowed values of :attr:`SteeringVector.operation`."""

_TINY = 1e-30


# --------------------------------------------------------------------------------------------- checks


def _check_acts(name: str, x: Tensor) -> Tensor:
    """Validate one activation tensor ``[n, n_layers, d]``: 3-D, floating, non-empty, finite."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape [n_samples, n_layers, d], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples), shape {tuple(x.shape)}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty (0 layers or 0 features), shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains inf")
    return x


def _check_pair(pos: Tensor, neg: Tensor, names: tuple[str, str] = ("pos", "neg")) -> tuple[Tensor, Tensor]:
    pos = _check_acts(names[0], pos)
    neg = _check_acts(names[1], neg)
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(
            f"shape mismatch: {names[0]} has shape {tuple(pos.shape)} and {names[1]} has shape "
            f"{tuple(neg.shape)}; n_layers and d must agree"
        )
    return pos, neg


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if math.isnan(lam) or lam < 0 or math.isinf(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def _check_weights(name: str, w: Tensor | None, n: int) -> Tensor | None:
    """Validate per-sample weights ``[n]``: finite, >= 0, positive sum. Returns float64 or ``None``."""
    if w is None:
        return None
    w = torch.as_tensor(w).detach().cpu().to(torch.float64).flatten()
    if w.numel() != n:
        raise ValueError(f"{name} must have {n} entries (one per sample), got {w.numel()}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (w < 0).any():
        raise ValueError(f"{name} must be >= 0")
    if w.sum() <= 0:
        raise ValueError(f"{name} sums to zero; at least one sample needs positive weight")
    return w


def _wmean(x: Tensor, w: Tensor | None) -> Tensor:
    """(Weighted) mean over dim 0 of ``x`` ``[n, ...]`` in float64.

    3-D inputs are reduced one layer at a time so a float64 copy of the whole tensor is never made.
    """
    if x.ndim == 3:
        return torch.stack([_wmean(x[:, layer], w) for layer in range(x.shape[1])])
    x = x.to(torch.float64)
    if w is None:
        return x.mean(0)
    w = w.to(x.device)
    return torch.tensordot(w, x, dims=1) / w.sum()


def _thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = P diag(s) Qh`` of ``x`` ``[n, d]``; wide ``x`` goes through ``xᵀ`` (faster on CPU)."""
    if x.shape[0] < x.shape[1]:
        u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(x, full_matrices=False)


def _top_eigvec(c: Tensor) -> tuple[float, Tensor]:
    """Top eigenvalue and unit eigenvector of ``cᵀc`` for ``c`` ``[n, d]``, via the smaller Gram matrix."""
    n, d = c.shape
    if n < d:
        evals, evecs = torch.linalg.eigh(c @ c.T)  # [n, n]
        u = c.T @ evecs[:, -1]
        return float(evals[-1]), u / u.norm().clamp_min(_TINY)
    evals, evecs = torch.linalg.eigh(c.T @ c)  # [d, d]
    return float(evals[-1]), evecs[:, -1]


# ------------------------------------------------------------------------------------------ estimators


def mean_diff(pos: Tensor, neg: Tensor) -> Tensor:
    """Difference in means, per layer.

    Args:
        pos: Activations of the "positive" (e.g. refusing) condition, ``[n_pos, n_layers, d]``.
        neg: Activations of the "negative" condition, ``[n_neg, n_layers, d]``.

    Returns:
        ``mean(pos, 0) − mean(neg, 0)``, ``[n_layers, d]`` float32 (accumulated in float64).

    Raises:
        ValueError: If either input is empty, contains NaN/inf, or their ``n_layers``/``d`` differ.
    """
    pos, neg = _check_pair(pos, neg)
    return (_wmean(pos, None) - _wmean(neg, None)).to(torch.float32)


def teacher_forced_mean_diff(with_prefix: Tensor, without_prefix: Tensor) -> Tensor:
    """CR-VLM's teacher-forced refusal vector: a difference in means over the same inputs.

    CR-VLM (Yang et al., "Steering to Say No", arXiv 2602.07013; eqs. 1–2 there, in the notation
    used here) amplifies the refusal
    signal by *teacher forcing*: each input ``x`` is fed once followed by a refusal prefix ``r``
    (e.g. "I'm sorry, but I can't") and once as is, and the residual stream ``h_l`` is read at every
    layer ``l`` (in this project's extractor: at the prefix's last token, resp. the prompt's last
    token). The refusal vector is the difference of the two means over the fitting set ``D``::

        v_l = 1/|D| Σ_{x∈D} h_l(x ⊕ r)  −  1/|D| Σ_{x∈D} h_l(x)

    i.e. :func:`mean_diff` with ``pos = with_prefix`` and ``neg = without_prefix``. Where the
    activations were read is recorded in :attr:`SteeringVector.positions`, not here.

    Args:
        with_prefix: Activations with the refusal prefix teacher-forced, ``[n, n_layers, d]``.
        without_prefix: Activations of the plain inputs, ``[m, n_layers, d]`` (usually ``m = n``,
            same inputs, but pairing is not required).

    Returns:
        ``[n_layers, d]`` float32.
    """
    return mean_diff(with_prefix, without_prefix)


def prompt_based(with_system_prompt: Tensor, without_system_prompt: Tensor) -> Tensor:
    """Prompt-based ("persona") vector: difference in means with vs without a refusal system prompt.

    The baseline that describes the refusal policy in a system prompt and distils it into a vector:
    ``mean(h(system ⊕ x)) − mean(h(x))`` per layer; the arithmetic of :func:`mean_diff`.

    Args:
        with_system_prompt: Activations with the system prompt, ``[n, n_layers, d]``.
        without_system_prompt: Activations without it, ``[m, n_layers, d]``.

    Returns:
        ``[n_layers, d]`` float32.
    """
    return mean_diff(with_system_prompt, without_system_prompt)


def normalize(v: Tensor) -> Tensor:
    """Scale each layer's direction to unit L2 norm.

    Args:
        v: ``[n_layers, d]``.

    Returns:
        ``[n_layers, d]`` float32 with unit-norm rows; all-zero rows stay zero.
    """
    v = torch.as_tensor(v)
    if v.ndim != 2:
        raise ValueError(f"expected [n_layers, d], got shape {tuple(v.shape)}")
    v64 = v.to(torch.float64)
    return (v64 / v64.norm(dim=-1, keepdim=True).clamp_min(_TINY)).to(torch.float32)


def rescale_to(direction: Tensor, reference: Tensor) -> Tensor:
    """Rescale each layer of ``direction`` to the norm of the same layer of ``reference``.

    Direction (and sign) are preserved: ``out_l = direction_l · ‖reference_l‖ / ‖direction_l‖``. Used to
    put ridge-type directions on the activation scale of the difference in means, so that steering
    strength ``α = 1`` means "mean-difference strength".

    Args:
        direction: ``[n_layers, d]``.
        reference: ``[n_layers, d]`` (typically the :func:`mean_diff`).

    Returns:
        ``[n_layers, d]`` float32. A layer whose direction is all zero stays zero.

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    direction, reference = torch.as_tensor(direction), torch.as_tensor(reference)
    if direction.ndim != 2 or direction.shape != reference.shape:
        raise ValueError(
            f"direction and reference must both be [n_layers, d] with equal shapes, got "
            f"{tuple(direction.shape)} and {tuple(reference.shape)}"
        )
    d64, r64 = direction.to(torch.float64), reference.to(torch.float64)
    scale = r64.norm(dim=-1, keepdim=True) / d64.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    return (d64 * scale).to(torch.float32)


def pca_direction(pos: Tensor, neg: Tensor) -> Tensor:
    """First principal component of centred paired differences, per layer.

    With ``δ_i = pos_i − neg_i`` (sample ``i`` of ``pos`` pairs sample ``i`` of ``neg``) and
    ``δ̄ = mean_i δ_i``, the direction at each layer is the top right-singular vector ``u`` of the
    centred matrix ``[δ_i − δ̄]_i``. Its sign is chosen so that ``u · δ̄ ≥ 0`` (it points along the
    mean paired difference), and it is scaled to ``‖δ̄‖`` — the norm of the difference in means — so it
    is on the same scale as :func:`mean_diff`. If a layer has no variance left after centring (all
    differences equal) the principal component is undefined and the mean difference is returned for
    that layer.

    Args:
        pos: ``[n, n_layers, d]``.
        neg: ``[n, n_layers, d]``, paired with ``pos`` row by row.

    Returns:
        ``[n_layers, d]`` float32.

    Raises:
        ValueError: On empty/NaN inputs, mismatched shapes (pairing needs equal ``n`` too) or ``n < 2``.
    """
    pos, neg = _check_pair(pos, neg)
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(
            f"pca_direction needs paired samples: pos has shape {tuple(pos.shape)} and neg has shape "
            f"{tuple(neg.shape)}"
        )
    if pos.shape[0] < 2:
        raise ValueError("pca_direction needs at least 2 pairs")
    out = torch.empty(pos.shape[1:], dtype=torch.float64, device=pos.device)
    for layer in range(pos.shape[1]):
        diff = pos[:, layer].to(torch.float64) - neg[:, layer].to(torch.float64)  # [n, d]
        mean = diff.mean(0)
        centred = diff - mean
        s2, u = _top_eigvec(centred)
        if s2 <= 1e-24 * float((diff * diff).sum()):  # no variance beyond rounding: PC undefined
            out[layer] = mean
            continue
        if u @ mean < 0:
            u = -u
        out[layer] = u * mean.norm()
    return out.to(torch.float32)


def _split_reference(acts: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
    """Mean activation of high-target minus low-target samples (split at the target range's midpoint)."""
    mid = (targets.max() + targets.min()) / 2
    hi, lo = targets > mid, targets < mid
    w_hi = None if weights is None else weights[hi]
    w_lo = None if weights is None else weights[lo]
    if (w_hi is not None and w_hi.sum() <= 0) or (w_lo is not None and w_lo.sum() <= 0):
        raise ValueError("cannot rescale: one side of the target split has zero total weight")
    return _wmean(acts[hi], w_hi) - _wmean(acts[lo], w_lo)


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
    acts = _check_acts("acts", acts)
    lam = _check_lam(lam)
    n, n_layers, d = acts.shape
    y = torch.as_tensor(targets).detach().to(torch.float64).flatten().to(acts.device)
    if y.numel() != n:
        raise ValueError(f"targets must have {n} entries (one per sample), got {y.numel()}")
    if not torch.isfinite(y).all():
        raise ValueError("targets contains NaN or inf")
    w = _check_weights("weights", weights, n)
    if w is not None:
        w = w.to(acts.device)
    if y.max() == y.min():
        raise ValueError("targets are constant; the regression direction is undefined")
    sqrt_w = None if w is None else w.sqrt()
    yc = y - _wmean(y, w)
    y_t = yc if sqrt_w is None else sqrt_w * yc
    out = torch.empty((n_layers, d), dtype=torch.float64, device=acts.device)
    for layer in range(n_layers):
        x = acts[:, layer].to(torch.float64)
        xc = x - _wmean(x, w)
        x_t = xc if sqrt_w is None else sqrt_w[:, None] * xc
        if lam > 0 and n <= d:  # dual form: n × n system
            a = x_t @ x_t.T + lam * torch.eye(n, dtype=torch.float64, device=x.device)
            out[layer] = x_t.T @ torch.linalg.solve(a, y_t)
        elif lam > 0:  # primal form: d × d system
            a = x_t.T @ x_t + lam * torch.eye(d, dtype=torch.float64, device=x.device)
            out[layer] = torch.linalg.solve(a, x_t.T @ y_t)
        else:  # λ = 0: minimum-norm least squares through the pseudo-inverse
            p, s, qh = _thin_svd(x_t)
            tol = max(n, d) * torch.finfo(torch.float64).eps * s.max()
            gain = torch.where(s > tol, 1.0 / s.clamp_min(_TINY), torch.zeros_like(s))
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
    pos, neg = _check_pair(pos, neg)
    lam = _check_lam(lam)
    wp = _check_weights("pos_weights", pos_weights, pos.shape[0])
    wn = _check_weights("neg_weights", neg_weights, neg.shape[0])
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
        mp, mn = _wmean(xp, wp), _wmean(xn, wn)
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
            _, s, qh = _thin_svd(u)
            s2 = s * s
            tol = max(u.shape) * torch.finfo(torch.float64).eps * s2.max()
            inv = torch.where(s2 > tol, 1.0 / s2.clamp_min(_TINY), torch.zeros_like(s2))
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


# ------------------------------------------------------------------------------------------- artifact


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous().to(torch.float32)
    return sha256_hex(str(tuple(t.shape)), t.numpy().tobytes())


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A fitted per-layer steering vector and how to apply it; saved as safetensors + JSON.

    Frozen: use :meth:`with_layers` / :meth:`with_alpha` (or :func:`dataclasses.replace`) for variants;
    every construction is validated in ``__post_init__``.

    Attributes:
        directions: ``[n_layers_total, d]`` float32, one vector for every layer of the model (coerced to
            float32; must be finite).
        method: The estimator, e.g. ``"teacher-forced"``, ``"teacher-forced-literal"``,
            ``"teacher-forced-prefix-mean"``, ``"prompt-based"``, ``"ridge"``, ``"mean-diff"``, ``"pca"``,
            ``"rmd"``, ``"wrmd"``; any non-empty string.
        layers: Layers the vector is *applied* at: non-empty, ``0 <= l < n_layers_total``, no
            duplicates; stored sorted.
        operation: ``"add"`` (``h ← h + α v_l``) or ``"project_out"`` (remove the component along
            ``v_l``).
        alpha: Default steering strength (finite).
        normalized: Whether ``directions`` rows are unit norm.
        positions: Token positions the activations were read at (free text: ``"last"``,
            ``"prefix-last"``, ``"prefix-mean"``, ...).
        hook_site: Where the vector is read and applied (``"decoder_layer_output"``).
        model_spec: The model the vector was fitted on.
        fingerprint: Fingerprint of the extraction (model, data, settings) that produced the activations.
        extra: Anything else JSON-serialisable (λ, scope, ...).
    """

    directions: Tensor
    method: str
    layers: list[int]
    operation: str = "add"
    alpha: float = 1.0
    normalized: bool = False
    positions: str = "last"
    hook_site: str = "decoder_layer_output"
    model_spec: str = ""
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.directions
        if not isinstance(d, Tensor):
            raise ValueError(f"directions must be a torch.Tensor, got {type(d).__name__}")
        if d.ndim != 2 or d.shape[0] == 0 or d.shape[1] == 0:
            raise ValueError(f"directions must be a non-empty [n_layers, d] tensor, got {tuple(d.shape)}")
        if not d.is_floating_point():
            raise ValueError(f"directions must be a floating-point tensor, got {d.dtype}")
        if not torch.isfinite(d).all():
            raise ValueError("directions contains NaN or inf")
        object.__setattr__(self, "directions", d.detach().to(torch.float32))

        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")

        try:
            if isinstance(self.layers, (str, bytes)) or any(isinstance(l, bool) for l in self.layers):
                raise TypeError
            layers = [operator.index(l) for l in self.layers]  # accepts numpy / 0-d torch ints
        except TypeError:
            raise ValueError(f"layers must be a list of ints, got {self.layers!r}") from None
        if not layers:
            raise ValueError("layers must be non-empty")
        n_layers = d.shape[0]
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: the vector has {n_layers} layers (0..{n_layers-1})")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers}")
        object.__setattr__(self, "layers", sorted(layers))

        alpha = float(self.alpha)
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "normalized", bool(self.normalized))
        for name in ("positions", "hook_site", "model_spec", "fingerprint"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"extra must be JSON-serialisable: {exc}") from exc

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the residual stream the vector was fitted on."""
        return int(self.directions.shape[1])

    @property
    def n_layers(self) -> int:
        """Number of decoder layers of the model the vector was fitted on (rows of ``directions``)."""
        return int(self.directions.shape[0])

    def check_compatible(self, n_layers: int, hidden_size: int) -> None:
        """Check that the vector fits a model with ``n_layers`` decoder layers of width ``hidden_size``.

        Raises:
            ValueError: ``"vector was fitted on a model with hidden size X / N layers; this model has
                Y / M"`` if either differs.
        """
        if int(n_layers) != self.n_layers or int(hidden_size) != self.hidden_size:
            raise ValueError(
                f"vector was fitted on a model with hidden size {self.hidden_size} / {self.n_layers} layers; "
                f"this model has {hidden_size} / {n_layers}"
            )

    def with_layers(self, layers: Iterable[int]) -> "SteeringVector":
        """A copy applied at ``layers`` instead (validated)."""
        return self._copy(layers=list(layers))

    def with_alpha(self, alpha: float) -> "SteeringVector":
        """A copy with default strength ``alpha``."""
        return self._copy(alpha=alpha)

    def _copy(self, **changes) -> "SteeringVector":
        base = dict(
            directions=self.directions.clone(), layers=list(self.layers), extra=copy.deepcopy(self.extra)
        )
        base.update(changes)
        return dataclasses.replace(self, **base)

    def to_json_dict(self) -> dict:
        """Every field but the tensor, plus ``hidden_size``, ``n_layers``, ``format_version`` and the
        SHA-256 of the tensor (``directions_sha256``, checked on load)."""
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "directions"}
        meta["layers"] = list(self.layers)
        meta.update(
            hidden_size=self.hidden_size,
            n_layers=self.n_layers,
            format_version=FORMAT_VERSION,
            directions_sha256=_tensor_digest(self.directions),
        )
        return meta

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/vector.safetensors`` and ``directory/vector.json``, each atomically.

        The tensor is written first and the JSON last, and the JSON records the tensor's SHA-256, so a
        crash between the two writes is detected by :meth:`load` instead of pairing stale metadata with
        a new tensor.

        Returns:
            ``directory`` as a :class:`~pathlib.Path` (created if needed).
        """
        directory = Path(directory)
        atomic_save_safetensors(
            directory / VECTOR_SAFETENSORS,
            {"directions": self.directions},
            metadata={"format_version": str(FORMAT_VERSION), "method": self.method},
        )
        atomic_write_json(directory / VECTOR_JSON, self.to_json_dict())
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "SteeringVector":
        """Read a vector written by :meth:`save`.

        Raises:
            FileNotFoundError: If the directory or either file is missing.
            ValueError: If the format version is unknown or the JSON does not match the tensor.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        paths = {name: directory / name for name in (VECTOR_JSON, VECTOR_SAFETENSORS)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"not a saved steering vector: missing {', '.join(missing)} "
                f"(SteeringVector.save writes {VECTOR_SAFETENSORS} and {VECTOR_JSON})"
            )
        meta = json.loads(paths[VECTOR_JSON].read_text(encoding="utf-8"))
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{paths[VECTOR_JSON]}: unsupported format_version {version!r} (expected {FORMAT_VERSION})"
            )
        tensors = load_file(paths[VECTOR_SAFETENSORS])
        if "directions" not in tensors:
            raise ValueError(f"{paths[VECTOR_SAFETENSORS]}: no 'directions' tensor")
        directions = tensors["directions"]
        if directions.ndim != 2 or (meta.get("n_layers"), meta.get("hidden_size")) != tuple(directions.shape):
            raise ValueError(
                f"{directory}: {VECTOR_JSON} says {meta.get('n_layers')} layers x {meta.get('hidden_size')} "
                f"but {VECTOR_SAFETENSORS} holds shape {tuple(directions.shape)}"
            )
        digest = meta.get("directions_sha256")
        if digest is not None and digest != _tensor_digest(directions):
            raise ValueError(
                f"{directory}: {VECTOR_SAFETENSORS} does not match {VECTOR_JSON} (sha256 differs); "
                "was a save interrupted? Re-save the vector."
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"directions"}
        return cls(directions=directions, **{k: v for k, v in meta.items() if k in names})
