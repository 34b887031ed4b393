"""The CR-VLM calibrator's losses (CR-VLM eq. 3–13), each a standalone function tested against hand-computed values,
and :func:`compute_losses`, every term of one training batch for a calibrator."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSS_TERMS", "compute_losses", "loss_in", "loss_ortho", "loss_out", "loss_vision", "total_loss"]

LOSS_TERMS = ("loss_out", "loss_in", "loss_ortho", "loss_vision")
"""Names of the four loss terms in the dicts :func:`compute_losses` returns and the training history logs."""

_COS_EPS = 1e-8


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=-1, eps=_COS_EPS)


def loss_out(h_new_out: Tensor, h_target: Tensor) -> Tensor:
    """Out-of-scope loss: ``mean(1 − cos(h′, h_target)) + MSE(h′, h_target)``.

    Args:
        h_new_out: Calibrated out-of-scope states ``[..., d]``.
        h_target: Targets ``h_out + λ·s``, same shape.

    Returns:
        Scalar: the cosine term averaged over all leading positions (samples, layers) plus the mean squared
        difference over all elements.
    """
    return (1 - _cos(h_new_out, h_target)).mean() + F.mse_loss(h_new_out, h_target)


def loss_in(h_new_in: Tensor, h_in: Tensor, rho_in: Tensor, rho_out: Tensor | None = None,
            gate_supervision: bool = True) -> Tensor:
    """In-scope loss: ``MSE(h′_in, h_in) + mean(ρ_in) + g``.

    The paper's ``g`` is read as gate supervision by scope label: the binary cross-entropy of the gate value ``ρ``
    against ``0`` for in-scope and ``1`` for out-of-scope samples, averaged over all gate values of *both* groups
    when ``rho_out`` is given (over the in-scope ones only otherwise). ``mean(ρ_in)`` already pulls the in-scope gate
    shut; ``g`` additionally opens the out-of-scope gate instead of leaving that to :func:`loss_out` alone.

    Args:
        h_new_in: Calibrated in-scope states ``[..., d]``.
        h_in: Original in-scope states, same shape.
        rho_in: In-scope gate values in (0, 1), any shape.
        rho_out: Out-of-scope gate values, any shape, or ``None``.
        gate_supervision: ``False`` drops ``g``.

    Returns:
        Scalar.
    """
    loss = F.mse_loss(h_new_in, h_in) + rho_in.mean()
    if gate_supervision:
        rho = rho_in.reshape(-1)
        labels = torch.zeros_like(rho)
        if rho_out is not None:
            rho = torch.cat([rho, rho_out.reshape(-1)])
            labels = torch.cat([labels, torch.ones_like(rho_out.reshape(-1))])
        loss = loss + F.binary_cross_entropy(rho, labels)
    return loss


def loss_ortho(delta_out: Tensor, delta_in: Tensor) -> Tensor:
    """Orthogonality loss ``cos²(mean Δ_out, mean Δ_in)``; ``Δ = h′ − h`` is the applied update.

    0 when the mean updates are orthogonal, 1 when parallel (or anti-parallel).

    Args:
        delta_out: Out-of-scope updates ``[n_out, ..., d]`` (means over dim 0).
        delta_in: In-scope updates ``[n_in, ..., d]``, same trailing shape.

    Returns:
        Scalar; with extra dims (e.g. layers ``[n, L, d]``) the per-layer values are averaged.
    """
    return (_cos(delta_out.mean(0), delta_in.mean(0)) ** 2).mean()


def loss_vision(pred_shift: Tensor, cf_shift: Tensor) -> Tensor:
    """Vision loss ``1 − cos(Σ_i r′_i, Σ_i r_i)``.

    ``r_i`` is sample ``i``'s vision-only counterfactual shift (the activation with the out-of-scope image and the
    refusal prefix minus the activation with an in-scope image), ``r′_i`` the calibrator's predicted (applied) shift
    ``x′ − x`` at that sample's input.

    Args:
        pred_shift: ``[n, ..., d]`` predicted shifts.
        cf_shift: ``[n, ..., d]`` counterfactual shifts.

    Returns:
        Scalar; with extra dims (layers) the per-layer values are averaged.
    """
    return (1 - _cos(pred_shift.sum(0), cf_shift.sum(0))).mean()


def total_loss(terms: Mapping[str, Tensor | None], w_out: float = 1.0, w_in: float = 1.0, w_ortho: float = 1.0,
               w_vision: float = 1.0) -> Tensor:
    """``w_out·L_out + w_in·L_in + w_ortho·L_ortho + w_vision·L_vision``.

    A term with weight 0, or missing / ``None`` in ``terms`` (e.g. the vision term on a batch without images), is
    switched off: it is left out of the sum (not multiplied by 0, so a non-finite switched-off term cannot leak in).

    Args:
        terms: ``loss_out``, ``loss_in``, ``loss_ortho``, ``loss_vision`` → scalar tensors (any may be missing).
        w_out, w_in, w_ortho, w_vision: Weights (≥ 0).

    Returns:
        Scalar tensor (0 if every term is switched off).
    """
    weights = dict(zip(LOSS_TERMS, (w_out, w_in, w_ortho, w_vision)))
    total = None
    for name, w in weights.items():
        term = terms.get(name)
        if w > 0 and term is not None:
            total = w * term if total is None else total + w * term
    if total is None:
        ref = next((t for t in terms.values() if isinstance(t, Tensor)), None)
        return ref.new_zeros(()) if ref is not None else torch.zeros(())
    return total


def compute_losses(calibrator, x_in: Tensor, x_out: Tensor, refusal_vectors: Tensor,
                   gate_in: Tensor | None = None, gate_out: Tensor | None = None,
                   vision_shift: Tensor | None = None, vision_inputs: Tensor | None = None,
                   vision_gate: Tensor | None = None) -> dict[str, Tensor]:
    """All loss terms for one batch, weighted per ``calibrator.config``.

    Args:
        calibrator: The :class:`~crvlm_core.methods.crvlm.module.Calibrator` being trained.
        x_in: In-scope activations ``[n_in, L, d]`` (``L = len(config.layers)``).
        x_out: Out-of-scope activations ``[n_out, L, d]``.
        refusal_vectors: ``s`` per steered layer ``[L, d]``; the target is ``x_out + target_scale·s``.
        gate_in, gate_out: Prefill gate inputs ``[n, d_gate]`` (both or neither).
        vision_shift: Counterfactual shifts ``r_i`` ``[k, L, d]`` of image samples, or ``None`` (no vision term).
        vision_inputs: The activations those samples' predicted shifts are taken at, ``[k, L, d]``.
        vision_gate: Their gate inputs ``[k, d_gate]`` if prefill gating is used.

    Returns:
        ``loss_out``, ``loss_in``, ``loss_ortho``, ``loss_vision`` (only when vision data is given), ``total``
        (:func:`total_loss` with the config's weights) and the mean gate values ``rho_in``, ``rho_out`` (detached).
        Terms with weight 0 are still computed, for monitoring, but are not part of ``total``.
    """
    cfg = calibrator.config
    n_in = x_in.shape[0]
    gate = None if gate_in is None else torch.cat([gate_in, gate_out])
    x_new, rho, _ = calibrator.forward_layers(torch.cat([x_in, x_out]), gate)
    new_in, new_out = x_new[:n_in], x_new[n_in:]
    rho_in, rho_out = rho[:n_in], rho[n_in:]
    target = x_out + cfg.target_scale * refusal_vectors
    terms: dict[str, Tensor] = {
        "loss_out": loss_out(new_out, target),
        "loss_in": loss_in(new_in, x_in, rho_in, rho_out, gate_supervision=cfg.gate_supervision),
        "loss_ortho": loss_ortho(new_out - x_out, new_in - x_in),
    }
    if vision_shift is not None and vision_shift.shape[0] > 0:
        v_new = calibrator.forward_layers(vision_inputs, vision_gate)[0]
        terms["loss_vision"] = loss_vision(v_new - vision_inputs, vision_shift)
    terms["total"] = total_loss(terms, cfg.w_out, cfg.w_in, cfg.w_ortho, cfg.w_vision)
    terms["rho_in"] = rho_in.detach().mean()
    terms["rho_out"] = rho_out.detach().mean()
    return terms
