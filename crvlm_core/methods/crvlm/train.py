"""The calibrator's fitter: seeded Adam training on cached activations (no model forward), with early stopping, a
per-epoch JSONL log, and resume checkpoints kept in the cache (keyed by the config and the data's fingerprint).

Training uses the activations of the steered layers only, each layer's block seeing the *unsteered* activation of its
own layer: with several steered layers, the change an earlier layer's update causes downstream is not seen.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from crvlm_core.core.cache import entry_path, key_digest
from crvlm_core.core.io import atomic_write_bytes
from crvlm_core.methods.crvlm.config import CalibratorConfig
from crvlm_core.methods.crvlm.data import data_fingerprint, epoch_indices, prepare_data, split_rows
from crvlm_core.methods.crvlm.losses import LOSS_TERMS, compute_losses
from crvlm_core.methods.crvlm.module import Calibrator, tensor_hash

__all__ = ["CHECKPOINT_NAME", "TrainRun", "checkpoint_path", "fit_probe_gate", "train_calibrator", "write_history"]

CHECKPOINT_NAME = "calibrator-ckpt"
"""Name of resume checkpoints in the cache: ``<cache>/calibrator-ckpt-<key digest>.pt``."""
_STATE_KEYS = ("epoch", "history", "best_val", "best_state", "bad_epochs", "stopped")


@dataclass(frozen=True)
class TrainRun:
    """How one training run is carried out and recorded (what is learned is the :class:`CalibratorConfig`).

    Attributes:
        cache_dir: Where resume checkpoints go (``crvlm_core.core.cache`` convention: ``None``/``False`` → none,
            ``True`` → ``outputs/cache/``, a path → that folder).
        log_path: JSONL file with one line per epoch, or ``None``.
        progress: Show a tqdm bar over epochs with the loss terms.
        checkpoint_every: Checkpoint period in epochs (and after the last one).
        callback: ``callback(epoch, entry)`` after each epoch (after its checkpoint); may raise to stop.
        model_spec: Recorded in the calibrator's metadata.
        n_model_layers: The model's decoder-layer count, recorded for :meth:`Calibrator.check_compatible`.
        vector_fingerprint: Recorded fingerprint of the refusal vectors (default: their SHA-256).
    """

    cache_dir: str | os.PathLike | bool | None = None
    log_path: str | os.PathLike | None = None
    progress: bool = True
    checkpoint_every: int = 10
    callback: Callable[[int, dict], None] | None = None
    model_spec: str = ""
    n_model_layers: int | None = None
    vector_fingerprint: str | None = None

    def __post_init__(self) -> None:
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or operator.index(every) < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1, got {every!r}")


def _resume_key(cfg: CalibratorConfig, fingerprint: str) -> dict:
    config = cfg.to_dict()
    config.pop("epochs")  # training further (epochs 3 → 6) resumes the same trajectory
    return {"format": "crvlm-calibrator-ckpt-v1", "config": config, "data": fingerprint}


def checkpoint_path(cache_dir, cfg: CalibratorConfig, fingerprint: str) -> Path | None:
    """Where the resume checkpoint of a run with ``cfg`` on data ``fingerprint`` lives (``None``: no cache)."""
    return entry_path(cache_dir, CHECKPOINT_NAME, _resume_key(cfg, fingerprint), ".pt")


def fit_probe_gate(calibrator: Calibrator, gate_in: Tensor, gate_out: Tensor, c: float = 1.0) -> None:
    """``gate_fit="probe"``: set every block's linear gate to an L2-regularised logistic regression (``C = c``) of
    out of scope (1) vs in scope (0) on standardised gate inputs, the two scopes weighted equally however many
    questions each has, the standardisation folded into the weights (``w/σ``, ``b − Σ w·μ/σ``), and freeze it
    (``requires_grad=False``)."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([gate_in, gate_out]).double()
    y = torch.cat([torch.zeros(len(gate_in)), torch.ones(len(gate_out))]).numpy()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    probe = LogisticRegression(C=c, max_iter=5000, class_weight="balanced").fit(((x - mu) / sd).numpy(), y)
    w = torch.as_tensor(probe.coef_[0]) / sd
    b = float(probe.intercept_[0]) - float((w * mu).sum())
    with torch.no_grad():
        for block in calibrator.blocks.values():
            block.gate.weight.copy_(w.reshape(1, -1).to(block.gate.weight.dtype))
            block.gate.bias.fill_(b)
            block.gate.requires_grad_(False)


class _Fit:
    """The mutable state of one run: model, optimiser, sampler RNG, history and early-stopping bookkeeping."""

    def __init__(self, cfg: CalibratorConfig, data: dict, run: TrainRun):
        self.cfg, self.data, self.run = cfg, data, run
        self.fingerprint = data_fingerprint(**data)
        vector_fp = run.vector_fingerprint or tensor_hash(data["refusal_vectors"])
        self.model = Calibrator(cfg, vector_fingerprint=vector_fp, data_fingerprint=self.fingerprint,
                                model_spec=run.model_spec, n_model_layers=run.n_model_layers)
        split_gen = torch.Generator().manual_seed(cfg.seed)
        self.train_in, self.val_in = split_rows(data["acts_in"].shape[0], cfg.val_fraction, split_gen, "in-scope")
        self.train_out, self.val_out = split_rows(data["acts_out"].shape[0], cfg.val_fraction, split_gen,
                                                  "out-of-scope")
        if cfg.gate_fit == "probe":
            if data["gate_in"] is None:
                raise ValueError("gate_fit='probe' needs prefill gate inputs (gate_in, gate_out)")
            fit_probe_gate(self.model, data["gate_in"][self.train_in], data["gate_out"][self.train_out])
        # fused Adam: one kernel for the whole update instead of ~10 elementwise passes per tensor; the optimiser step
        # was 41 % of a training step on CPU (torch.profiler, Qwen-sized calibrator), fused it is 12 %
        trained = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(trained, lr=cfg.lr, fused=all(p.device.type in ("cpu", "cuda") for p in trained))
        self.batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.steps = -(-max(self.train_in.numel(), self.train_out.numel()) // cfg.batch_size)
        self.key = key_digest(_resume_key(cfg, self.fingerprint))
        self.ckpt = checkpoint_path(run.cache_dir, cfg, self.fingerprint)
        self.state = {"epoch": 0, "history": [], "best_val": None, "best_state": None, "bad_epochs": 0,
                      "stopped": False}

    def resume(self) -> None:
        """Continue from the cached checkpoint, if one of this run's key exists, is readable and not past the end."""
        if self.ckpt is None or not self.ckpt.is_file():
            return
        try:
            ckpt = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a damaged cache entry is recomputed, whatever torch raises
            warnings.warn(f"{self.ckpt}: unreadable checkpoint ({err}); training from scratch", stacklevel=3)
            return
        if ckpt.get("key") != self.key:
            warnings.warn(f"{self.ckpt}: checkpoint key differs from this run's; ignoring it", stacklevel=3)
        elif ckpt["epoch"] > self.cfg.epochs:
            warnings.warn(f"{self.ckpt}: checkpoint is at epoch {ckpt['epoch']} > epochs={self.cfg.epochs}; "
                          "training from scratch (the checkpoint will be overwritten)", stacklevel=3)
        else:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.batch_gen.set_state(ckpt["batch_rng"])
            self.state = {k: ckpt[k] for k in _STATE_KEYS}

    def checkpoint(self) -> None:
        if self.ckpt is None:
            return
        buf = io.BytesIO()
        torch.save({"key": self.key, "config": self.cfg.to_dict(), "data_fingerprint": self.fingerprint,
                    "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "batch_rng": self.batch_gen.get_state(), **self.state}, buf)
        atomic_write_bytes(self.ckpt, buf.getvalue())

    def batch_losses(self, rows_in: Tensor, rows_out: Tensor) -> dict[str, Tensor]:
        data = self.data
        pick = lambda key, rows: None if data[key] is None else data[key][rows]  # noqa: E731
        v_shift = v_in = v_gate = None
        if data["vision_shift"] is not None:
            vrows = rows_out[data["vision_mask"][rows_out]]
            if vrows.numel():
                v_shift = data["vision_shift"][vrows]
                v_in = data["acts_out"][vrows] if data["vision_inputs"] is None else data["vision_inputs"][vrows]
                v_gate = pick("gate_out", vrows) if data["vision_gate"] is None else data["vision_gate"][vrows]
        return compute_losses(self.model, data["acts_in"][rows_in], data["acts_out"][rows_out],
                              data["refusal_vectors"], pick("gate_in", rows_in), pick("gate_out", rows_out), v_shift,
                              v_in, v_gate)

    def epoch(self, epoch: int) -> dict:
        """One epoch of Adam steps; the history entry (means of the terms, ``val_*`` on the validation set)."""
        bs, steps = self.cfg.batch_size, self.steps
        self.model.train()
        rows_in = epoch_indices(self.train_in, steps * bs, self.batch_gen)
        rows_out = epoch_indices(self.train_out, steps * bs, self.batch_gen)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for s in range(steps):
            terms = self.batch_losses(rows_in[s * bs:(s + 1) * bs], rows_out[s * bs:(s + 1) * bs])
            self.opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            self.opt.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
                counts[name] = counts.get(name, 0) + 1
        entry: dict = {"epoch": epoch + 1, "steps": steps, **{name: sums[name] / counts[name] for name in sums}}
        if self.val_in.numel():
            self.model.eval()
            with torch.no_grad():
                val_terms = self.batch_losses(self.val_in, self.val_out)
            entry.update({f"val_{name}": float(v) for name, v in val_terms.items()})
        bad = [k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"calibrator training diverged at epoch {epoch + 1}: {bad} not finite "
                                     f"({ {k: entry[k] for k in bad} }); try a lower lr")
        return entry

    def early_stopping(self, entry: dict) -> None:
        state = self.state
        if self.cfg.patience is None:
            return
        if state["best_val"] is None or entry["val_total"] < state["best_val"]:
            state.update(best_val=entry["val_total"], bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in self.model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
            state["stopped"] = state["bad_epochs"] >= self.cfg.patience


def write_history(path: str | os.PathLike, history: list[dict]) -> Path:
    """Write a training history as JSONL (one epoch per line, sorted keys), atomically: the log's format."""
    return atomic_write_bytes(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in history).encode())


def train_calibrator(cfg: CalibratorConfig, acts_in: Tensor, acts_out: Tensor, refusal_vectors: Tensor,
                     gate_in: Tensor | None = None, gate_out: Tensor | None = None,
                     vision: Mapping[str, Tensor] | None = None,
                     run: TrainRun | None = None) -> tuple[Calibrator, list[dict]]:
    """Train a calibrator on cached activations (no model forward); seeded, checkpointed and resumable.

    Each step draws ``batch_size`` in-scope and ``batch_size`` out-of-scope samples (each group walks through
    random permutations of its training pool, so every sample is seen once before any repeats) and takes one Adam
    step on :func:`~crvlm_core.methods.crvlm.losses.compute_losses`' ``total``. An epoch is
    ``ceil(max(n_in, n_out) / batch_size)`` steps.

    Resuming: with ``run.cache_dir``, a checkpoint (weights, Adam state, sampler RNG state, epoch, history,
    early-stopping state) is written atomically every ``run.checkpoint_every`` epochs and after the last one, to
    the cache entry :func:`checkpoint_path` (keyed by the config — all fields but ``epochs`` — and the data's
    :func:`~crvlm_core.methods.crvlm.data.data_fingerprint`). A later call with the same key resumes from it — also
    with more ``epochs``, or after the process was killed — and reaches the same final weights as an uninterrupted
    run; a finished run returns at once. A checkpoint *past* ``cfg.epochs`` or unreadable is ignored.

    Logging: ``run.log_path`` gets one JSON line per epoch (the epoch's mean of each term, ``total``, mean gate
    values, and ``val_*`` terms with a validation split), flushed as written; on (re)start the file is rewritten from
    the history so far, so it never holds an interrupted run's stale lines.

    Args:
        cfg: Architecture and training settings.
        acts_in: In-scope activations ``[n_in, L, d]`` at ``cfg.layers`` (``L = len(cfg.layers)``).
        acts_out: Out-of-scope activations ``[n_out, L, d]``.
        refusal_vectors: Teacher-forced refusal vector per steered layer, ``[L, d]``.
        gate_in, gate_out: Prefill gate inputs ``[n_in, d_gate]`` / ``[n_out, d_gate]`` (both or neither; required
            when ``cfg.gate_dim`` differs from ``hidden_size``).
        vision: Optional vision counterfactuals tied to the out-of-scope samples: ``{"shifts": [n_out, L, d]}``
            plus optionally ``"mask"`` (bool ``[n_out]``, which rows have image data; default all), ``"inputs"``
            (``[n_out, L, d]`` activations the predicted shift is taken at; default ``acts_out``) and ``"gate"``
            (``[n_out, d_gate]``; default ``gate_out``). The vision term is active on steps whose out-of-scope
            batch contains image rows.
        run: Checkpoints, log, progress bar, callback and recorded provenance (:class:`TrainRun`; default: none).

    Returns:
        ``(calibrator, history)``: the trained calibrator in eval mode (the best-validation weights when
        ``cfg.patience`` is set, else the last) and one dict per epoch.

    Raises:
        ValueError: Empty activations, hidden size / layer count mismatch with ``cfg``, a ``refusal_vectors`` shape
            other than ``[L, d]``, malformed gate or vision inputs.
        FloatingPointError: If a loss becomes NaN or inf.
    """
    run = run if run is not None else TrainRun()
    fit = _Fit(cfg, prepare_data(cfg, acts_in, acts_out, refusal_vectors, gate_in, gate_out, vision), run)
    fit.resume()
    state = fit.state
    log = None if run.log_path is None else write_history(run.log_path, state["history"])
    bar = tqdm(range(state["epoch"], cfg.epochs), initial=state["epoch"], total=cfg.epochs, desc="calibrator",
               unit="epoch", disable=not run.progress or state["stopped"])
    logf = None if log is None else open(log, "a", encoding="utf-8")
    try:
        for epoch in bar:
            if state["stopped"]:
                break
            entry = fit.epoch(epoch)
            state["history"].append(entry)
            if logf is not None:
                logf.write(json.dumps(entry, sort_keys=True) + "\n")
                logf.flush()
            fit.early_stopping(entry)
            state["epoch"] = epoch + 1
            bar.set_postfix({k.replace("loss_", ""): f"{entry[k]:.3g}"
                             for k in (*LOSS_TERMS, "total", "val_total") if k in entry})
            if (epoch + 1) % run.checkpoint_every == 0 or epoch + 1 == cfg.epochs or state["stopped"]:
                fit.checkpoint()
            if run.callback is not None:
                run.callback(epoch + 1, entry)
    finally:
        bar.close()
        if logf is not None:
            logf.close()
    if cfg.patience is not None and state["best_state"] is not None:
        fit.model.load_state_dict(state["best_state"])
    return fit.model.eval(), state["history"]
