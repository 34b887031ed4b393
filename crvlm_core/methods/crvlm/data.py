"""The training data of a calibrator: checks of the activation, refusal-vector, gate and vision tensors against the
config, their fingerprint (the key of resume checkpoints), the seeded validation split and batch sampling."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from crvlm_core.core.io import sha256_hex
from crvlm_core.methods.crvlm.config import CalibratorConfig
from crvlm_core.methods.crvlm.module import tensor_hash

__all__ = ["data_fingerprint", "epoch_indices", "prepare_data", "split_rows"]


def data_fingerprint(**tensors: Tensor | None) -> str:
    """SHA-256 over named tensors (name, shape, dtype, bytes); ``None`` entries count as absent-but-named.

    Used to tie a checkpoint and a saved calibrator to the exact training data.
    """
    parts: list[str] = ["crvlm-calibrator-data-v1"]
    for name in sorted(tensors):
        t = tensors[name]
        parts += [name, "none" if t is None else tensor_hash(t)]
    return sha256_hex(*parts)


def _as_float(name: str, t, shape: tuple | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t


def _check_acts(name: str, acts, cfg: CalibratorConfig) -> Tensor:
    if not isinstance(acts, Tensor):
        acts = torch.as_tensor(acts)
    if acts.ndim != 3:
        raise ValueError(f"{name} must be [n_samples, {len(cfg.layers)} layers, {cfg.hidden_size}], got "
                         f"{list(acts.shape)}")
    if acts.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples): training needs in-scope and out-of-scope activations")
    if acts.shape[2] != cfg.hidden_size:
        raise ValueError(f"{name} has hidden size {acts.shape[2]} but the config says hidden_size="
                         f"{cfg.hidden_size}")
    if acts.shape[1] != len(cfg.layers):
        raise ValueError(f"{name} has {acts.shape[1]} layers but the config steers {len(cfg.layers)} "
                         f"({list(cfg.layers)}); pass the activations at those layers only, in that order")
    return _as_float(name, acts)


def prepare_data(cfg: CalibratorConfig, acts_in, acts_out, refusal_vectors, gate_in=None, gate_out=None,
                 vision=None) -> dict[str, Tensor | None]:
    """The training tensors checked against ``cfg`` (shapes, finiteness), as float32 on CPU, by name (see
    :func:`~crvlm_core.methods.crvlm.train.train_calibrator` for what each is).

    Raises:
        ValueError: one line naming the tensor and what is wrong with it.
    """
    L, d = len(cfg.layers), cfg.hidden_size
    data: dict[str, Tensor | None] = {"acts_in": _check_acts("acts_in", acts_in, cfg),
                                      "acts_out": _check_acts("acts_out", acts_out, cfg)}
    n_in, n_out = data["acts_in"].shape[0], data["acts_out"].shape[0]
    rv = torch.as_tensor(refusal_vectors) if not isinstance(refusal_vectors, Tensor) else refusal_vectors
    if tuple(rv.shape) != (L, d):
        raise ValueError(f"refusal_vectors must be [{L} layers, {d}] (one vector per steered layer {list(cfg.layers)}), "
                         f"got {list(rv.shape)}")
    data["refusal_vectors"] = _as_float("refusal_vectors", rv)
    if (gate_in is None) != (gate_out is None):
        raise ValueError("pass both gate_in and gate_out (prefill gate inputs) or neither")
    if gate_in is None and cfg.d_gate != d:
        raise ValueError(f"config gate_dim={cfg.gate_dim} differs from hidden_size: the gate reads prefill "
                         "summaries, so gate_in and gate_out are required")
    data["gate_in"] = None if gate_in is None else _as_float("gate_in", gate_in, (n_in, cfg.d_gate))
    data["gate_out"] = None if gate_out is None else _as_float("gate_out", gate_out, (n_out, cfg.d_gate))
    data["vision_shift"] = data["vision_inputs"] = data["vision_gate"] = data["vision_mask"] = None
    if vision is not None:
        if not isinstance(vision, Mapping):
            raise ValueError(f"vision must be a dict, got {type(vision).__name__}")
        unknown = set(vision) - {"shifts", "inputs", "mask", "gate"}
        if unknown or "shifts" not in vision:
            raise ValueError(f"vision takes keys 'shifts' (required), 'inputs', 'mask', 'gate'; got {sorted(vision)}")
        data["vision_shift"] = _as_float("vision['shifts']", vision["shifts"], (n_out, L, d))
        if vision.get("inputs") is not None:
            data["vision_inputs"] = _as_float("vision['inputs']", vision["inputs"], (n_out, L, d))
        if vision.get("gate") is not None:
            data["vision_gate"] = _as_float("vision['gate']", vision["gate"], (n_out, cfg.d_gate))
        elif data["gate_out"] is not None and data["vision_inputs"] is not None:
            raise ValueError("vision['inputs'] given with prefill gating: also give vision['gate']")
        mask = vision.get("mask")
        mask = torch.ones(n_out, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != (n_out,):
            raise ValueError(f"vision['mask'] must be a bool tensor [{n_out}], got {mask.dtype} {list(mask.shape)}")
        data["vision_mask"] = mask.cpu()
    return data


def split_rows(n: int, frac: float, gen: torch.Generator, name: str) -> tuple[Tensor, Tensor]:
    """``(train rows, validation rows)`` of ``n`` samples, a seeded ``frac`` of them held out (sorted)."""
    perm = torch.randperm(n, generator=gen)
    if frac == 0:
        return perm, perm[:0]
    n_val = max(1, int(round(n * frac)))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={frac} leaves no {name} training samples (n={n})")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def epoch_indices(pool: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``count`` indices from ``pool``: concatenated random permutations (every sample once before any repeats)."""
    reps = -(-count // pool.numel())
    return torch.cat([pool[torch.randperm(pool.numel(), generator=gen)] for _ in range(reps)])[:count]
