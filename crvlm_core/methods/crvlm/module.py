"""The CR-VLM calibrator network: ``x′ = x + α·ρ·Δx`` per steered layer (flow MLP Δx, gate ρ, learned α), its
prefill-gate override for generation, and its weights' files (``calibrator.safetensors`` + ``calibrator.json``).

For a hidden state ``x ∈ R^d`` at a steered layer::

    Δx = W3 · SiLU(W2 · SiLU(W1 · x))         flow network  Linear(d, W) → SiLU → Linear(W, W) → SiLU → Linear(W, d)
    ρ  = σ(w_g · g + b_g)                      gate network  Linear(d_gate, 1) → sigmoid; g = x unless a gate input is given
                                               (``gate_hidden`` H > 0: LayerNorm → Linear(d_gate, H) → SiLU → Linear(H, 1))
    x' = x + α · ρ · Δx                        α a learned scalar, initialised to 1
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from crvlm_core.core.io import atomic_save_safetensors, atomic_write_json, sha256_hex
from crvlm_core.core.fields import index_list
from crvlm_core.methods.crvlm.config import CalibratorConfig
from crvlm_core.steer.interventions import HiddenStateFn

__all__ = ["CALIBRATOR_JSON", "CALIBRATOR_SAFETENSORS", "Calibrator", "FORMAT_VERSION", "GATE_EPS", "state_digest",
           "tensor_hash"]

CALIBRATOR_SAFETENSORS = "calibrator.safetensors"
"""File name of the weights inside a saved calibrator's directory."""
CALIBRATOR_JSON = "calibrator.json"
"""File name of the metadata (config, fingerprints, format version) inside a saved calibrator's directory."""
FORMAT_VERSION = 1
"""Version of the calibrator's file format written by :meth:`Calibrator.save`."""
GATE_EPS = 1e-6
"""The gate is ``ρ = ε + (1 − 2ε)·σ(z)``: strictly inside (0, 1) even where float32 ``σ`` saturates, so the gate's
binary cross-entropy stays finite."""


class _Block(nn.Module):
    """One calibrator block: flow network, gate, learned scale α."""

    def __init__(self, d: int, width: int, d_gate: int, gate_hidden: int = 0):
        super().__init__()
        self.flow = nn.Sequential(nn.Linear(d, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                  nn.Linear(width, d))
        self.gate = nn.Linear(d_gate, 1) if not gate_hidden else \
            nn.Sequential(nn.LayerNorm(d_gate, elementwise_affine=False), nn.Linear(d_gate, gate_hidden), nn.SiLU(),
                          nn.Linear(gate_hidden, 1))
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
        d, w, dg, gh = config.hidden_size, config.width, config.d_gate, config.gate_hidden
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if config.shared:
                self.blocks = nn.ModuleDict({"shared": _Block(d, w, dg, gh)})
                self.layer_embedding = nn.Parameter(torch.zeros(len(config.layers), d))
            else:
                self.blocks = nn.ModuleDict({str(layer): _Block(d, w, dg, gh) for layer in config.layers})
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
            raise ValueError(f"layer {layer} is not steered by this calibrator (layers {self.layers})")
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
        steered layers), for :func:`crvlm_core.steer.generate.steered_generate` and friends.

        Raises:
            ValueError: If a requested layer is not steered by this calibrator.
        """
        layers = self.layers if layers is None else index_list("layers", layers)
        bad = [l for l in layers if l not in self._index]
        if bad:
            raise ValueError(f"layers {bad} are not steered by this calibrator (layers {self.layers})")
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

    def gate_override_rows(self, layer: int) -> Tensor | None:
        """The ``[batch]`` gate values :meth:`set_gate_override` fixed for ``layer``, or ``None`` when none is set."""
        override = self._gate_override
        return override.get(layer) if isinstance(override, dict) else override

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
            "weights_sha256": state_digest(self.state_dict()),
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
        meta["weights_sha256"] = state_digest(state)
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
        if digest is not None and digest != state_digest(state):
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


def tensor_hash(t: Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def state_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict (names and float32 tensors), recorded with saved weights."""
    return sha256_hex(*[part for k in sorted(state) for part in (k, tensor_hash(state[k].to(torch.float32)))])
