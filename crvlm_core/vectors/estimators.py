"""Steering-vector estimators over cached activations: each maps activations ``[n_samples, n_layers, d]`` to one
direction per layer ``[n_layers, d]`` (float32) for *all* layers given; choosing the layers is a later step.

Estimators (per layer ``l``; ``x_i`` is a sample's activation at that layer):

* :func:`mean_diff` — ``μ_pos − μ_neg`` (difference in means, as in andyrdt/refusal_direction).
  :func:`teacher_forced_mean_diff` (CR-VLM) and :func:`prompt_based` (persona baseline) are the same
  arithmetic under the names of the protocols that produce their inputs.
* :func:`pca_direction` — first principal component of the centred *paired* differences ``pos_i − neg_i``.
* :func:`~crvlm_core.vectors.ridge.ridge_direction`, :func:`~crvlm_core.vectors.ridge.rmd`,
  :func:`~crvlm_core.vectors.ridge.wrmd` — the ridge-type estimators (:mod:`crvlm_core.vectors.ridge`).

The fitted artifact is :class:`crvlm_core.vectors.steering_vector.SteeringVector`. Internally everything is
computed in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from crvlm_core.vectors.checks import check_pair
from crvlm_core.vectors.linalg import top_eigvec, weighted_mean

__all__ = ["mean_diff", "pca_direction", "prompt_based", "teacher_forced_mean_diff"]


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
    pos, neg = check_pair(pos, neg)
    return (weighted_mean(pos, None) - weighted_mean(neg, None)).to(torch.float32)


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
    pos, neg = check_pair(pos, neg)
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
        s2, u = top_eigvec(centred)
        if s2 <= 1e-24 * float((diff * diff).sum()):  # no variance beyond rounding: PC undefined
            out[layer] = mean
            continue
        if u @ mean < 0:
            u = -u
        out[layer] = u * mean.norm()
    return out.to(torch.float32)


