"""Per-layer linear algebra in float64 shared by the estimators: (weighted) means, thin SVD, the top eigenvector,
unit-norm directions and directions rescaled to a reference's norm."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["TINY", "normalize", "rescale_to", "thin_svd", "top_eigvec", "weighted_mean"]

TINY = 1e-30
"""Floor for norms and singular values that are divided by."""


def weighted_mean(x: Tensor, w: Tensor | None) -> Tensor:
    """(Weighted) mean over dim 0 of ``x`` ``[n, ...]`` in float64.

    3-D inputs are reduced one layer at a time so a float64 copy of the whole tensor is never made.
    """
    if x.ndim == 3:
        return torch.stack([weighted_mean(x[:, layer], w) for layer in range(x.shape[1])])
    x = x.to(torch.float64)
    if w is None:
        return x.mean(0)
    w = w.to(x.device)
    return torch.tensordot(w, x, dims=1) / w.sum()


def thin_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = P diag(s) Qh`` of ``x`` ``[n, d]``; wide ``x`` goes through ``xᵀ`` (faster on CPU)."""
    if x.shape[0] < x.shape[1]:
        u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
        return vh.T, s, u.T
    return torch.linalg.svd(x, full_matrices=False)


def top_eigvec(c: Tensor) -> tuple[float, Tensor]:
    """Top eigenvalue and unit eigenvector of ``cᵀc`` for ``c`` ``[n, d]``, via the smaller Gram matrix."""
    n, d = c.shape
    if n < d:
        evals, evecs = torch.linalg.eigh(c @ c.T)  # [n, n]
        u = c.T @ evecs[:, -1]
        return float(evals[-1]), u / u.norm().clamp_min(TINY)
    evals, evecs = torch.linalg.eigh(c.T @ c)  # [d, d]
    return float(evals[-1]), evecs[:, -1]


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
    return (v64 / v64.norm(dim=-1, keepdim=True).clamp_min(TINY)).to(torch.float32)


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
    scale = r64.norm(dim=-1, keepdim=True) / d64.norm(dim=-1, keepdim=True).clamp_min(TINY)
    return (d64 * scale).to(torch.float32)

