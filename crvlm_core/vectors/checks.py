"""Input checks shared by the steering-vector estimators: activations ``[n, n_layers, d]``, a pair of them, a ridge
penalty and per-sample weights; each raises ValueError with one line naming the input."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_acts", "check_lam", "check_pair", "check_weights"]


def check_acts(name: str, x: Tensor) -> Tensor:
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


def check_pair(pos: Tensor, neg: Tensor, names: tuple[str, str] = ("pos", "neg")) -> tuple[Tensor, Tensor]:
    pos = check_acts(names[0], pos)
    neg = check_acts(names[1], neg)
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(
            f"shape mismatch: {names[0]} has shape {tuple(pos.shape)} and {names[1]} has shape "
            f"{tuple(neg.shape)}; n_layers and d must agree"
        )
    return pos, neg


def check_lam(lam: float) -> float:
    lam = float(lam)
    if math.isnan(lam) or lam < 0 or math.isinf(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    return lam


def check_weights(name: str, w: Tensor | None, n: int) -> Tensor | None:
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

