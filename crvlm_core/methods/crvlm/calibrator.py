"""CR-VLM calibrator: a small gated residual network per steered layer, trained on cached activations to push
out-of-scope hidden states toward refusal and leave in-scope ones unchanged (CR-VLM §4.2–4.4, appendix H).

Shape of the module (concept-erasure style): :func:`train_calibrator` is the *fitter* (seeded, checkpointed,
resumable) and :class:`Calibrator` the artifact it returns, callable on ``[..., d]`` hidden states, saved as
``calibrator.safetensors`` + ``calibrator.json`` and plugged into generation through :meth:`Calibrator.as_intervention`.

The network, for a hidden state ``x ∈ R^d`` at a steered layer::

    Δx = W3 · SiLU(W2 · SiLU(W1 · x))         flow network  Linear(d, W) → SiLU → Linear(W, W) → SiLU → Linear(W, d)
    ρ  = σ(w_g · g + b_g)                      gate network  Linear(d_gate, 1) → sigmoid; g = x unless a gate input is given
    x' = x + α · ρ · Δx                        α a learned scalar, initialised to 1

The losses (each a standalone function below, tested against hand-computed values):

* :func:`loss_out` (eq. 3–5): out-of-scope states go to ``h_target = h_out + λ·s`` (``s`` the teacher-forced refusal
  vector of the layer): ``mean(1 − cos(h′, h_target)) + MSE(h′, h_target)``.
* :func:`loss_in` (eq. 6–8): in-scope states stay put and the gate stays shut: ``MSE(h′_in, h_in) + mean(ρ_in) + g``.
* :func:`loss_ortho` (eq. 9–10): the mean out-of-scope update is orthogonal to the mean in-scope update.
* :func:`loss_vision` (eq. 11–12): the summed predicted shift points along the summed vision-only counterfactual shift.
* :func:`total_loss` (eq. 13): ``w_out·L_out + w_in·L_in + w_ortho·L_ortho + w_vision·L_vision``.

Training uses the activations of the steered layers only, each layer's block seeing the *unsteered* activation of its
own layer (no model forward): with several steered layers, the change an earlier layer's update causes downstream is
not seen during training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import operator
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from crvlm_core.core.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, sha256_hex

__all__ = [
    "CALIBRATOR_JSON",
    "CALIBRATOR_SAFETENSORS",
    "Calibrator",
    "CalibratorConfig",
    "FORMAT_VERSION",
    "GATE_EPS",
    "LOSS_TERMS",
    "compute_losses",
    "data_fingerprint",
    "loss_in",
    "loss_ortho",
    "loss_out",
    "loss_vision",
    "total_loss",
    "train_calibrator",
]

CALIBRATOR_SAFETENSORS = "calibrator.safetensors"
"""File name of the weights inside a saved calibrator's directory."""
CALIBRATOR_JSON = "calibrator.json"
"""File name of the metadata (config, fingerprints, format version) inside a saved calibrator's directory."""
FORMAT_VERSION = 1
"""Version of the on-disk calibrator format written by :meth:`Calibrator.save`."""
GATE_EPS = 1e-6
"""The gate is ``ρ = ε + (1 − 2ε)·σ(z)``: strictly inside (0, 1) even where float32 ``σ`` saturates, so the gate's
binary cross-entropy stays finite."""
LOSS_TERMS = ("loss_out", "loss_in", "loss_ortho", "loss_vision")
"""Names of the four loss terms in the dicts :func:`compute_losses` returns and the training history logs."""

_COS_EPS = 1e-8
_CKPT_PREFIX = "calibrator-ckpt-"


# ---------------------------------------------------------------------------------------------------- config


def _index_list(name: str, values) -> list[int]:
    try:
        if isinstance(values, (str, bytes)) or any(isinstance(v, bool) for v in values):
            raise TypeError
        return [operator.index(v) for v in values]
    except TypeError:
        raise ValueError(f"{name} must be a list of ints, got {values!r}") from None


@dataclass
class CalibratorConfig:
    """Architecture and training settings of a calibrator; validated on construction.

    Attributes:
        hidden_size: Width ``d`` of the model's residual stream.
        layers: The steered decoder layers. Activations passed to :func:`train_calibrator` are ``[n, len(layers), d]``
            with ``acts[:, j]`` read at ``layers[j]`` (order kept as given; no duplicates).
        width: Hidden width ``W`` of the flow network.
        shared: ``False`` (default): one block (flow, gate, α) per steered layer — each layer learns its own update,
            and blocks do not compete for capacity. ``True``: one block for all layers, with a learned per-layer
            embedding (initialised to zero) added to its input — ``1/len(layers)`` of the parameters.
        gate_dim: Width of the gate's input. ``None`` → ``hidden_size`` (the gate reads ``x``). Another value means
            the gate reads an explicit prefill summary (``gate_input``; e.g. a late layer's last-prompt-token state).
        target_scale: ``λ`` in the out-of-scope target ``h_out + λ·s``.
        w_out: Weight of :func:`loss_out` in the total.
        w_in: Weight of :func:`loss_in`.
        w_ortho: Weight of :func:`loss_ortho`.
        w_vision: Weight of :func:`loss_vision` (only active on batches with vision counterfactuals).
        gate_supervision: Include the gate's binary cross-entropy ``g`` in :func:`loss_in`.
        lr: Adam learning rate.
        batch_size: In-scope *and* out-of-scope samples per step (each step sees ``batch_size`` of each).
        epochs: Training epochs; an epoch is ``ceil(max(n_in, n_out) / batch_size)`` steps.
        seed: Seeds initialisation, the validation split and batch sampling (same seed → identical weights).
        val_fraction: Fraction of each group (in / out) held out for validation, ``0 ≤ f < 1``; with ``f > 0`` the
            history has ``val_*`` entries (same terms, whole validation set, no gradient).
        patience: Early stopping: stop once the validation total loss has not improved for ``patience`` epochs and
            return the weights of the best validation epoch. Requires ``val_fraction > 0``.
    """

    hidden_size: int
    layers: list[int]
    width: int = 1024
    shared: bool = False
    gate_dim: int | None = None
    target_scale: float = 1.0
    w_out: float = 1.0
    w_in: float = 1.0
    w_ortho: float = 1.0
    w_vision: float = 1.0
    gate_supervision: bool = True
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 200
    seed: int = 42
    val_fraction: float = 0.0
    patience: int | None = None

    def __post_init__(self) -> None:
        def pos_int(name: str, minimum: int = 1) -> int:
            v = getattr(self, name)
            if isinstance(v, bool):
                raise ValueError(f"{name} must be an int, got {v!r}")
            try:
                v = operator.index(v)
            except TypeError:
                raise ValueError(f"{name} must be an int, got {v!r}") from None
            if v < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {v}")
            setattr(self, name, v)
            return v

        def finite(name: str, minimum: float | None = None, strict: bool = False) -> float:
            try:
                v = float(getattr(self, name))
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}") from None
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
            if minimum is not None and (v <= minimum if strict else v < minimum):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {v}")
            setattr(self, name, v)
            return v

        pos_int("hidden_size")
        pos_int("width")
        pos_int("batch_size")
        pos_int("epochs")
        if self.gate_dim is not None:
            pos_int("gate_dim")
        if isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        pos_int("seed", minimum=0)
        layers = _index_list("layers", self.layers)
        if not layers:
            raise ValueError("layers must be non-empty")
        if any(l < 0 for l in layers):
            raise ValueError(f"layers must be >= 0, got {layers}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers contains duplicates: {layers}")
        self.layers = layers
        self.shared = bool(self.shared)
        self.gate_supervision = bool(self.gate_supervision)
        finite("target_scale")
        for name in ("w_out", "w_in", "w_ortho", "w_vision"):
            finite(name, minimum=0.0)
        if self.w_out == self.w_in == self.w_ortho == self.w_vision == 0:
            raise ValueError("all loss weights are 0; nothing to train")
        finite("lr", minimum=0.0, strict=True)
        f = finite("val_fraction", minimum=0.0)
        if f >= 1:
            raise ValueError(f"val_fraction must be < 1, got {f}")
        if self.patience is not None:
            pos_int("patience")
            if f == 0:
                raise ValueError("patience (early stopping) needs a validation set: set val_fraction > 0")

    @property
    def d_gate(self) -> int:
        """Width of the gate's input (``gate_dim``, or ``hidden_size`` when ``None``)."""
        return self.hidden_size if self.gate_dim is None else self.gate_dim

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict (round-trips through ``CalibratorConfig(**d)``)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- losses


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


# ---------------------------------------------------------------------------------------------------- network


class _Block(nn.Module):
    """One calibrator block: flow network, gate, learned scale α."""

    def __init__(self, d: int, width: int, d_gate: int):
        super().__init__()
        self.flow = nn.Sequential(nn.Linear(d, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, d))
        self.gate = nn.Linear(d_gate, 1)
        self.alpha = nn.Parameter(torch.ones(()))


class Calibrator(nn.Module):
    """The CR-VLM calibrator: ``x′ = x + α·ρ·Δx`` at each steered layer (see the module docstring).

    Built untrained from a config (initialisation seeded by ``config.seed``, without touching the global RNG);
    :func:`train_calibrator` returns a trained one, :meth:`load` reads a saved one. Float32 on CPU by default;
    ``.to(device, dtype)`` works as for any module.

    Per-layer (``shared=False``, the default): ``blocks`` is an ``nn.ModuleDict`` with one block per steered layer,
    keyed by ``str(layer)``. Shared (``shared=True``): ``blocks`` holds one block under ``"shared"``, and
    ``layer_embedding[j]`` (``[len(layers), d]``, zero-initialised) is added to the input of the flow network (and
    of the gate, when the gate reads ``x``) at ``layers[j]``.

    Gate input, by priority: an explicit ``gate_input`` passed to :meth:`forward`; else a gate override set by
    :meth:`set_gate_override` (per-batch-row ρ, for prefill gating during generation); else ``x`` itself (only
    possible when ``gate_dim`` is ``None`` or equals ``hidden_size``).

    Attributes:
        config: The :class:`CalibratorConfig`.
        vector_fingerprint: Fingerprint of the refusal vectors the calibrator was trained toward.
        data_fingerprint: Fingerprint of the training activations (:func:`data_fingerprint`).
        model_spec: The model the activations came from (free text, may be empty).
        n_model_layers: Decoder-layer count of that model, if known.
    """

    def __init__(self, config: CalibratorConfig, *, vector_fingerprint: str = "", data_fingerprint: str = "",
                 model_spec: str = "", n_model_layers: int | None = None):
        super().__init__()
        if not isinstance(config, CalibratorConfig):
            raise ValueError(f"config must be a CalibratorConfig, got {type(config).__name__}")
        self.config = config
        self.vector_fingerprint = str(vector_fingerprint)
        self.data_fingerprint = str(data_fingerprint)
        self.model_spec = str(model_spec)
        self.n_model_layers = None if n_model_layers is None else int(n_model_layers)
        self._index = {layer: j for j, layer in enumerate(config.layers)}
        self._gate_override: Tensor | dict[int, Tensor] | None = None
        d, w, dg = config.hidden_size, config.width, config.d_gate
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.shared:
                self.blocks = nn.ModuleDict({"shared": _Block(d, w, dg)})
                self.layer_embedding = nn.Parameter(torch.zeros(len(config.layers), d))
            else:
                self.blocks = nn.ModuleDict({str(layer): _Block(d, w, dg) for layer in config.layers})
                self.layer_embedding = None

    # ---------------------------------------------------------------- properties

    @property
    def layers(self) -> list[int]:
        """The steered layers."""
        return list(self.config.layers)

    @property
    def hidden_size(self) -> int:
        """Width ``d`` of the hidden states the calibrator works on."""
        return self.config.hidden_size

    def _param(self) -> Tensor:
        return next(self.parameters())

    # ---------------------------------------------------------------- forward

    def _block(self, layer: int) -> tuple[_Block, int]:
        j = self._index.get(int(layer))
        if j is None:
            raise ValueError(f"layer {layer} is not steered by this calibrator (layers {self.config.layers})")
        return (self.blocks["shared"] if self.config.shared else self.blocks[str(int(layer))]), j

    def _gate(self, block: _Block, z_in: Tensor) -> Tensor:
        """``[..., d_gate] → [..., 1]`` gate values ``ε + (1−2ε)·σ(·)``."""
        return GATE_EPS + (1 - 2 * GATE_EPS) * torch.sigmoid(block.gate(z_in))

    def forward(self, x: Tensor, layer: int, gate_input: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Calibrate hidden states ``x`` of one steered layer.

        Args:
            x: Hidden states ``[..., d]`` (any leading dims).
            layer: The decoder layer ``x`` was read at (one of :attr:`layers`).
            gate_input: Optional gate input ``[..., d_gate]`` whose leading dims are a prefix of ``x``'s (e.g.
                ``[batch, d_gate]`` for ``x`` of shape ``[batch, seq, d]``: one gate value per row).

        Returns:
            ``(x_new, rho, delta)``: ``x_new = x + α·ρ·delta`` ``[..., d]``; ``rho`` the gate values broadcast to
            ``x.shape[:-1]``; ``delta`` the flow network's raw output ``[..., d]`` (the applied update is
            ``x_new − x``).

        Raises:
            ValueError: For a layer that is not steered, wrong widths, or a gate that needs an explicit input.
        """
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states have width {x.shape[-1]}; this calibrator works on hidden size "
                             f"{self.hidden_size}")
        block, j = self._block(layer)
        h = x if self.layer_embedding is None else x + self.layer_embedding[j]
        delta = block.flow(h)
        rho = self._rho(block, h, x, int(layer), gate_input)
        x_new = x + block.alpha * rho * delta
        return x_new, rho.squeeze(-1).expand(x.shape[:-1]), delta

    def _rho(self, block: _Block, h: Tensor, x: Tensor, layer: int, gate_input: Tensor | None) -> Tensor:
        """Gate values shaped to broadcast against ``x`` (``[..., 1]``)."""
        if gate_input is not None:
            if gate_input.shape[-1] != self.config.d_gate:
                raise ValueError(f"gate_input has width {gate_input.shape[-1]}; this calibrator's gate reads "
                                 f"{self.config.d_gate}")
            lead = tuple(gate_input.shape[:-1])
            if lead != tuple(x.shape[:len(lead)]) or len(lead) >= x.ndim:
                raise ValueError(f"gate_input leading shape {lead} is not a prefix of the hidden states' leading "
                                 f"shape {tuple(x.shape[:-1])}")
            rho = self._gate(block, gate_input.to(h.device, h.dtype))
            return rho.reshape(*lead, *([1] * (x.ndim - len(lead))))
        override = self._gate_override
        if override is not None:
            rows = override.get(layer) if isinstance(override, dict) else override
            if rows is None:
                raise ValueError(f"the gate override has no entry for layer {layer} (has {sorted(override)})")
            if x.ndim < 2 or rows.shape[0] != x.shape[0]:
                raise ValueError(f"gate override has {rows.shape[0]} rows but the hidden states have shape "
                                 f"{tuple(x.shape)} (batch first)")
            return rows.to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        if self.config.d_gate != self.hidden_size:
            raise ValueError(f"this calibrator's gate reads a {self.config.d_gate}-dim prefill summary: pass "
                             "gate_input, or set_gate_override(...) before generation")
        return self._gate(block, h)

    def forward_layers(self, x: Tensor, gate_input: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Run every steered layer's block on activations stacked by layer.

        Args:
            x: ``[n, len(layers), d]``, ``x[:, j]`` read at ``layers[j]``.
            gate_input: Optional ``[n, d_gate]`` (the same prefill summary for every layer).

        Returns:
            ``(x_new [n, L, d], rho [n, L], delta [n, L, d])``.
        """
        if x.ndim != 3 or x.shape[1] != len(self.config.layers):
            raise ValueError(f"expected activations [n, {len(self.config.layers)}, d] (one per steered layer), got "
                             f"{tuple(x.shape)}")
        outs = [self.forward(x[:, j], layer, gate_input) for j, layer in enumerate(self.config.layers)]
        return tuple(torch.stack(parts, dim=1) for parts in zip(*outs))  # type: ignore[return-value]

    def apply_hidden(self, layer: int, hidden: Tensor) -> Tensor:
        """The steering hook: calibrated ``hidden`` (``[batch, seq, d]`` or any ``[..., d]``) at ``layer``.

        Computes in the calibrator's device/dtype and returns ``hidden + update`` in ``hidden``'s device/dtype. The
        gate reads the hidden state itself unless a gate override is set (:meth:`set_gate_override`). Named
        ``apply_hidden`` rather than ``apply`` because :meth:`torch.nn.Module.apply` (``fn`` on every submodule)
        must keep its meaning.
        """
        p = self._param()
        x = hidden.to(p.device, p.dtype)
        x_new = self.forward(x, layer)[0]
        return hidden + (x_new - x).to(hidden.device, hidden.dtype)

    def as_intervention(self, layers: Sequence[int] | None = None):
        """A :class:`crvlm_core.steer.interventions.HiddenStateFn` running :meth:`apply_hidden` at ``layers`` (default: all
        steered layers), for :func:`crvlm_core.steer.interventions.steered_generate` and friends.

        Raises:
            ValueError: If a requested layer is not steered by this calibrator.
        """
        from crvlm_core.steer.interventions import HiddenStateFn  # steer pulls in the model stack; keep this module light

        layers = self.layers if layers is None else _index_list("layers", layers)
        bad = [l for l in layers if l not in self._index]
        if bad:
            raise ValueError(f"layers {bad} are not steered by this calibrator (layers {self.config.layers})")
        return HiddenStateFn(self.apply_hidden, tuple(layers))

    # ---------------------------------------------------------------- prefill gating

    @torch.no_grad()
    def gate_values(self, gate_input: Tensor) -> dict[int, Tensor]:
        """Gate values ``ρ`` per steered layer for prefill summaries ``gate_input`` ``[batch, d_gate]``.

        Returns:
            ``layer → [batch]`` (what :meth:`set_gate_override` accepts). With ``shared=True`` and an explicit gate
            input, every layer gets the same values.
        """
        if gate_input.ndim != 2 or gate_input.shape[1] != self.config.d_gate:
            raise ValueError(f"gate_input must be [batch, {self.config.d_gate}], got {tuple(gate_input.shape)}")
        p = self._param()
        g = gate_input.to(p.device, p.dtype)
        return {layer: self._gate(self._block(layer)[0], g).squeeze(-1) for layer in self.config.layers}

    def set_gate_override(self, rho_rows: Tensor | Mapping[int, Tensor]) -> None:
        """Fix the gate value of each batch row for the following calls (prefill gating during generation).

        Args:
            rho_rows: ``[batch]`` values in ``[0, 1]`` used at every steered layer, or ``layer → [batch]`` (e.g.
                from :meth:`gate_values`). Row ``i`` applies to ``hidden[i]`` whatever the sequence length, so one
                override serves the prompt pass and every generated token. An explicit ``gate_input`` to
                :meth:`forward` still takes precedence.
        """
        def check(t) -> Tensor:
            t = torch.as_tensor(t).detach()
            if t.ndim != 1 or t.numel() == 0:
                raise ValueError(f"gate override must be a non-empty [batch] tensor, got shape {tuple(t.shape)}")
            if not t.is_floating_point() or not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
                raise ValueError("gate override values must be finite floats in [0, 1]")
            return t

        if isinstance(rho_rows, Mapping):
            table = {int(l): check(v) for l, v in rho_rows.items()}
            bad = [l for l in table if l not in self._index]
            if bad:
                raise ValueError(f"gate override for layers {bad} not steered by this calibrator")
            sizes = {v.shape[0] for v in table.values()}
            if len(sizes) > 1:
                raise ValueError(f"gate override rows differ in batch size across layers: {sorted(sizes)}")
            self._gate_override = table
        else:
            self._gate_override = check(rho_rows)

    def clear_gate_override(self) -> None:
        """Go back to gating on the hidden state itself."""
        self._gate_override = None

    @contextmanager
    def gate_override(self, rho_rows: Tensor | Mapping[int, Tensor]) -> Iterator["Calibrator"]:
        """``with calibrator.gate_override(rho): ...`` — :meth:`set_gate_override` on entry, cleared on exit."""
        self.set_gate_override(rho_rows)
        try:
            yield self
        finally:
            self.clear_gate_override()

    # ---------------------------------------------------------------- compatibility, save / load

    def check_compatible(self, n_layers: int, hidden_size: int) -> None:
        """Check that the calibrator fits a model with ``n_layers`` decoder layers of width ``hidden_size``.

        Raises:
            ValueError: ``"calibrator was trained on hidden size X (layers [...]); this model has Y"`` for a width
                mismatch; a similar message if a steered layer does not exist in the model or the layer count
                recorded at training differs.
        """
        n_layers, hidden_size = int(n_layers), int(hidden_size)
        if hidden_size != self.hidden_size:
            raise ValueError(f"calibrator was trained on hidden size {self.hidden_size} (layers {self.layers}); "
                             f"this model has {hidden_size}")
        if self.n_model_layers is not None and n_layers != self.n_model_layers:
            raise ValueError(f"calibrator was trained on a model with {self.n_model_layers} layers; this model has "
                             f"{n_layers}")
        bad = [l for l in self.layers if l >= n_layers]
        if bad:
            raise ValueError(f"calibrator steers layers {bad}, but this model has {n_layers} layers "
                             f"(0..{n_layers - 1})")

    def to_json_dict(self) -> dict:
        """Metadata written to ``calibrator.json``: config, fingerprints, model, format version, weights digest."""
        return {
            "config": self.config.to_dict(),
            "vector_fingerprint": self.vector_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "model_spec": self.model_spec,
            "n_model_layers": self.n_model_layers,
            "format_version": FORMAT_VERSION,
            "weights_sha256": _state_digest(self.state_dict()),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/calibrator.safetensors`` then ``directory/calibrator.json``, each atomically.

        The JSON records the weights' SHA-256, so a crash between the two writes is detected by :meth:`load`.

        Returns:
            ``directory`` as a :class:`~pathlib.Path` (created if needed).
        """
        directory = Path(directory)
        state = {k: v.detach().to("cpu", torch.float32) for k, v in self.state_dict().items()}
        atomic_save_safetensors(directory / CALIBRATOR_SAFETENSORS, state,
                                metadata={"format_version": str(FORMAT_VERSION)})
        meta = self.to_json_dict()
        meta["weights_sha256"] = _state_digest(state)
        atomic_write_json(directory / CALIBRATOR_JSON, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Calibrator":
        """Read a calibrator written by :meth:`save` (float32, CPU, eval mode).

        Raises:
            FileNotFoundError: If either file is missing.
            ValueError: If the format version is unknown or the weights do not match the JSON.
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        paths = {name: directory / name for name in (CALIBRATOR_JSON, CALIBRATOR_SAFETENSORS)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"not a saved calibrator: missing {', '.join(missing)} (Calibrator.save writes "
                                    f"{CALIBRATOR_SAFETENSORS} and {CALIBRATOR_JSON})")
        meta = json.loads(paths[CALIBRATOR_JSON].read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{paths[CALIBRATOR_JSON]}: unsupported format_version {meta.get('format_version')!r} "
                             f"(expected {FORMAT_VERSION})")
        state = load_file(paths[CALIBRATOR_SAFETENSORS])
        digest = meta.get("weights_sha256")
        if digest is not None and digest != _state_digest(state):
            raise ValueError(f"{directory}: {CALIBRATOR_SAFETENSORS} does not match {CALIBRATOR_JSON} (sha256 "
                             "differs); was a save interrupted? Re-save the calibrator.")
        cal = cls(CalibratorConfig(**meta["config"]), vector_fingerprint=meta.get("vector_fingerprint", ""),
                  data_fingerprint=meta.get("data_fingerprint", ""), model_spec=meta.get("model_spec", ""),
                  n_model_layers=meta.get("n_model_layers"))
        try:
            cal.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{directory}: weights do not fit the saved config: {exc}") from exc
        return cal.eval()


def _tensor_hash(t: Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def _state_digest(state: Mapping[str, Tensor]) -> str:
    return sha256_hex(*[part for k in sorted(state) for part in (k, _tensor_hash(state[k].to(torch.float32)))])


def data_fingerprint(**tensors: Tensor | None) -> str:
    """SHA-256 over named tensors (name, shape, dtype, bytes); ``None`` entries count as absent-but-named.

    Used to tie a checkpoint and a saved calibrator to the exact training data.
    """
    parts: list[str] = ["crvlm-calibrator-data-v1"]
    for name in sorted(tensors):
        t = tensors[name]
        parts += [name, "none" if t is None else _tensor_hash(t)]
    return sha256_hex(*parts)


# ---------------------------------------------------------------------------------------------------- training


def compute_losses(calibrator: Calibrator, x_in: Tensor, x_out: Tensor, refusal_vectors: Tensor,
                   gate_in: Tensor | None = None, gate_out: Tensor | None = None,
                   vision_shift: Tensor | None = None, vision_inputs: Tensor | None = None,
                   vision_gate: Tensor | None = None) -> dict[str, Tensor]:
    """All loss terms for one batch, weighted per ``calibrator.config``.

    Args:
        calibrator: The model being trained.
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
                         f"({cfg.layers}); pass the activations at those layers only, in that order")
    return _as_float(name, acts)


def _prepare(cfg, acts_in, acts_out, refusal_vectors, gate_in, gate_out, vision) -> dict[str, Tensor | None]:
    L, d = len(cfg.layers), cfg.hidden_size
    data: dict[str, Tensor | None] = {"acts_in": _check_acts("acts_in", acts_in, cfg),
                                      "acts_out": _check_acts("acts_out", acts_out, cfg)}
    n_in, n_out = data["acts_in"].shape[0], data["acts_out"].shape[0]
    rv = torch.as_tensor(refusal_vectors) if not isinstance(refusal_vectors, Tensor) else refusal_vectors
    if tuple(rv.shape) != (L, d):
        raise ValueError(f"refusal_vectors must be [{L} layers, {d}] (one vector per steered layer {cfg.layers}), "
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


def _split(n: int, frac: float, gen: torch.Generator, name: str) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=gen)
    if frac == 0:
        return perm, perm[:0]
    n_val = max(1, int(round(n * frac)))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={frac} leaves no {name} training samples (n={n})")
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _epoch_indices(pool: Tensor, count: int, gen: torch.Generator) -> Tensor:
    """``count`` indices from ``pool``: concatenated random permutations (every sample once before any repeats)."""
    reps = -(-count // pool.numel())
    return torch.cat([pool[torch.randperm(pool.numel(), generator=gen)] for _ in range(reps)])[:count]


def _batch_losses(model: Calibrator, data: dict, rows_in: Tensor, rows_out: Tensor) -> dict[str, Tensor]:
    pick = lambda key, rows: None if data[key] is None else data[key][rows]  # noqa: E731
    v_shift = v_in = v_gate = None
    if data["vision_shift"] is not None:
        vrows = rows_out[data["vision_mask"][rows_out]]
        if vrows.numel():
            v_shift = data["vision_shift"][vrows]
            v_in = data["acts_out"][vrows] if data["vision_inputs"] is None else data["vision_inputs"][vrows]
            v_gate = pick("gate_out", vrows) if data["vision_gate"] is None else data["vision_gate"][vrows]
    return compute_losses(model, data["acts_in"][rows_in], data["acts_out"][rows_out], data["refusal_vectors"],
                          pick("gate_in", rows_in), pick("gate_out", rows_out), v_shift, v_in, v_gate)


def _resume_key(cfg: CalibratorConfig, fingerprint: str) -> str:
    cfg_dict = cfg.to_dict()
    cfg_dict.pop("epochs")  # training further (epochs 3 → 6) resumes the same trajectory
    return sha256_hex("crvlm-calibrator-ckpt-v1", json.dumps(cfg_dict, sort_keys=True), fingerprint)


def _write_log(path: Path | None, history: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for entry in history:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


def train_calibrator(
    cfg: CalibratorConfig,
    acts_in: Tensor,
    acts_out: Tensor,
    refusal_vectors: Tensor,
    gate_in: Tensor | None = None,
    gate_out: Tensor | None = None,
    vision: Mapping[str, Tensor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    checkpoint_every: int = 10,
    callback: Callable[[int, dict], None] | None = None,
    model_spec: str = "",
    n_model_layers: int | None = None,
    vector_fingerprint: str | None = None,
) -> tuple[Calibrator, list[dict]]:
    """Train a calibrator on cached activations (no model forward); seeded, checkpointed and resumable.

    Each step draws ``batch_size`` in-scope and ``batch_size`` out-of-scope samples (each group walks through
    random permutations of its training pool, so every sample is seen once before any repeats) and takes one Adam
    step on :func:`compute_losses`' ``total``. An epoch is ``ceil(max(n_in, n_out) / batch_size)`` steps.

    Resuming: with ``checkpoint_dir``, a checkpoint (weights, Adam state, sampler RNG state, epoch, history,
    early-stopping state) is written atomically every ``checkpoint_every`` epochs and after the last one, to
    ``calibrator-ckpt-<key>.pt`` where ``<key>`` hashes the config (all fields but ``epochs``) and the data
    (:func:`data_fingerprint`). A later call with the same key resumes from it — also with more ``epochs`` — and
    reaches the same final weights as an uninterrupted run; a finished run returns at once. A checkpoint *past*
    ``cfg.epochs`` is ignored (training restarts and overwrites it).

    Logging: ``log_path`` gets one JSON line per epoch (the epoch's mean of each term, ``total``, mean gate values,
    and ``val_*`` terms with a validation split), flushed as written; on (re)start the file is rewritten from the
    history so far, so it never holds an interrupted run's stale lines.

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
        checkpoint_dir: Folder for checkpoints, or ``None`` for none.
        log_path: JSONL log file, or ``None``.
        progress: Show a tqdm bar over epochs with the loss terms.
        checkpoint_every: Checkpoint period in epochs.
        callback: ``callback(epoch, entry)`` after each epoch (after its checkpoint); may raise to stop.
        model_spec: Recorded in the calibrator's metadata.
        n_model_layers: The model's decoder-layer count, recorded for :meth:`Calibrator.check_compatible`.
        vector_fingerprint: Recorded fingerprint of the refusal vectors (default: their SHA-256).

    Returns:
        ``(calibrator, history)``: the trained calibrator in eval mode (the best-validation weights when
        ``cfg.patience`` is set, else the last) and one dict per epoch.

    Raises:
        ValueError: Empty activations, hidden size / layer count mismatch with ``cfg``, a ``refusal_vectors`` shape
            other than ``[L, d]``, malformed gate or vision inputs.
        FloatingPointError: If a loss becomes NaN or inf.
    """
    if isinstance(checkpoint_every, bool) or operator.index(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1, got {checkpoint_every!r}")
    data = _prepare(cfg, acts_in, acts_out, refusal_vectors, gate_in, gate_out, vision)
    fingerprint = data_fingerprint(**data)
    if vector_fingerprint is None:
        vector_fingerprint = _tensor_hash(data["refusal_vectors"])
    model = Calibrator(cfg, vector_fingerprint=vector_fingerprint, data_fingerprint=fingerprint,
                       model_spec=model_spec, n_model_layers=n_model_layers)
    # fused Adam: one kernel for the whole update instead of ~10 elementwise passes per tensor; the optimiser step
    # was 41 % of a training step on CPU (torch.profiler, Qwen-sized calibrator), fused it is 12 %
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                           fused=all(p.device.type in ("cpu", "cuda") for p in model.parameters()))

    split_gen = torch.Generator().manual_seed(cfg.seed)
    train_in, val_in = _split(data["acts_in"].shape[0], cfg.val_fraction, split_gen, "in-scope")
    train_out, val_out = _split(data["acts_out"].shape[0], cfg.val_fraction, split_gen, "out-of-scope")
    batch_gen = torch.Generator().manual_seed(cfg.seed + 1)
    steps = -(-max(train_in.numel(), train_out.numel()) // cfg.batch_size)

    key = _resume_key(cfg, fingerprint)
    ckpt_path = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{_CKPT_PREFIX}{key[:16]}.pt"
    state = {"epoch": 0, "history": [], "best_val": None, "best_state": None, "bad_epochs": 0, "stopped": False}
    if ckpt_path is not None and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("key") != key:
            warnings.warn(f"{ckpt_path}: checkpoint key differs from this run's; ignoring it", stacklevel=2)
        elif ckpt["epoch"] > cfg.epochs:
            warnings.warn(f"{ckpt_path}: checkpoint is at epoch {ckpt['epoch']} > epochs={cfg.epochs}; training "
                          "from scratch (the checkpoint will be overwritten)", stacklevel=2)
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            batch_gen.set_state(ckpt["batch_rng"])
            state = {k: ckpt[k] for k in state}
    history: list[dict] = state["history"]
    log = None if log_path is None else Path(log_path)
    _write_log(log, history)

    def save_checkpoint(epoch: int) -> None:
        if ckpt_path is None:
            return
        buf = io.BytesIO()
        torch.save({"key": key, "config": cfg.to_dict(), "data_fingerprint": fingerprint, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "batch_rng": batch_gen.get_state(),
                    **{k: state[k] for k in ("history", "best_val", "best_state", "bad_epochs", "stopped")}}, buf)
        atomic_write_bytes(ckpt_path, buf.getvalue())

    bar = tqdm(range(state["epoch"], cfg.epochs), initial=state["epoch"], total=cfg.epochs, desc="calibrator",
               unit="epoch", disable=not progress or state["stopped"])
    logf = None if log is None else open(log, "a", encoding="utf-8")
    try:
        for epoch in bar:
            if state["stopped"]:
                break
            model.train()
            rows_in = _epoch_indices(train_in, steps * cfg.batch_size, batch_gen)
            rows_out = _epoch_indices(train_out, steps * cfg.batch_size, batch_gen)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            for s in range(steps):
                sl = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
                terms = _batch_losses(model, data, rows_in[sl], rows_out[sl])
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                for name, value in terms.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                    counts[name] = counts.get(name, 0) + 1
            entry: dict = {"epoch": epoch + 1, "steps": steps}
            entry.update({name: sums[name] / counts[name] for name in sums})
            if val_in.numel():
                model.eval()
                with torch.no_grad():
                    val_terms = _batch_losses(model, data, val_in, val_out)
                entry.update({f"val_{name}": float(v) for name, v in val_terms.items()})
            bad = [k for k, v in entry.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"calibrator training diverged at epoch {epoch + 1}: {bad} not finite "
                                         f"({ {k: entry[k] for k in bad} }); try a lower lr")
            history.append(entry)
            if logf is not None:
                logf.write(json.dumps(entry, sort_keys=True) + "\n")
                logf.flush()
            if cfg.patience is not None:
                if state["best_val"] is None or entry["val_total"] < state["best_val"]:
                    state["best_val"] = entry["val_total"]
                    state["best_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    state["bad_epochs"] = 0
                else:
                    state["bad_epochs"] += 1
                    state["stopped"] = state["bad_epochs"] >= cfg.patience
            bar.set_postfix({k.replace("loss_", ""): f"{entry[k]:.3g}"
                             for k in (*LOSS_TERMS, "total", "val_total") if k in entry})
            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == cfg.epochs or state["stopped"]:
                save_checkpoint(epoch + 1)
            if callback is not None:
                callback(epoch + 1, entry)
    finally:
        bar.close()
        if logf is not None:
            logf.close()
    if cfg.patience is not None and state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    return model.eval(), history
