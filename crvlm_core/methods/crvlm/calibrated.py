"""The fitted CR-VLM method: a calibrator applied on every token at generation, gated on the steered layer's own state
(the paper) or on a late-layer summary of the prompt computed once at prefill; saved and loaded as one artifact.

The artifact (kind ``"crvlm"``, written whole by :func:`crvlm_core.core.artifacts.write_artifact`) holds
``calibrator.safetensors`` + ``calibrator.json`` (weights, fingerprints), ``crvlm.json`` (layers, gate layer, the
fit's config and info), ``train_log.jsonl`` (the training history) and the refusal vector in ``refusal_vector/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.artifacts import check_model, read_manifest, write_artifact
from crvlm_core.core.io import atomic_write_json
from crvlm_core.data.schema import Sample
from crvlm_core.extract import extract
from crvlm_core.methods.crvlm.config import CrvlmConfig, check_push
from crvlm_core.methods.crvlm.module import Calibrator
from crvlm_core.methods.crvlm.train import write_history
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import PrefillGate
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["CRVLM_JSON", "KIND", "TRAIN_LOG", "VECTOR_DIR", "CalibratedSteering", "default_gate_layer",
           "load_calibrated"]

KIND = "crvlm"
CRVLM_JSON = "crvlm.json"
TRAIN_LOG = "train_log.jsonl"
VECTOR_DIR = "refusal_vector"


def default_gate_layer(handle: ModelHandle) -> int:
    """A late layer (90 % of the depth): where scope is linearly separable (probe 0.98–1.00 at layers 22–24 of
    Qwen2.5-0.5B, 0.95–0.98 at 23–29 of SmolLM2), unlike the layers where steering bites."""
    return min(handle.n_layers - 1, round(0.9 * handle.n_layers))


@dataclass
class CalibratedSteering(PrefillGate):
    """The calibrator as an intervention. With ``gate_layer`` set, each batch first runs one unsteered prompt pass
    to read the last prompt token at that layer; the gate value ρ of each row is fixed from it for the prompt pass
    and every generated token (prefill gating)."""

    calibrator: Calibrator
    layers: tuple[int, ...]
    gate_layer: int | None = None
    info: dict = field(default_factory=dict)
    vector: SteeringVector | None = None  # the refusal vector the targets were built from (saved alongside)
    fixed_gate: float | None = None  # ablation "gate off": ρ held at this value for every row (e.g. 1.0)
    config: CrvlmConfig | None = None  # the settings of the fit that made it (None when built by hand)
    history: list = field(default_factory=list, repr=False)  # one dict per training epoch
    gate_pass: str = "separate"  # "shared": one prompt pass, steering from the last prompt token (PrefillGate)
    hard_gate: bool = False  # a prefill gate's ρ rounded to 0 / 1 at 0.5 (CrvlmConfig.hard_gate)
    gate_extra_layers: tuple[int, ...] = ()  # more layers the prefill gate reads (CrvlmConfig.gate_extra_layers)
    in_scope_push: float = 0.0  # β: −β·(1 − ρ)·v where the prefill gate reads in scope (CrvlmConfig.in_scope_push)

    def __post_init__(self):
        self.layers = tuple(int(l) for l in self.layers)
        self.gate_extra_layers = tuple(sorted({int(l) for l in self.gate_extra_layers} - {self.gate_layer}))
        if self.gate_extra_layers and self.gate_layer is None:
            raise ValueError("gate_extra_layers are read with a prefill gate: they need a gate_layer")
        if self.fixed_gate is not None and not 0.0 <= float(self.fixed_gate) <= 1.0:
            raise ValueError(f"fixed_gate must be in [0, 1], got {self.fixed_gate}")
        if self.hard_gate and self.gate_layer is None:
            raise ValueError("hard_gate rounds a prefill gate's value: it needs a gate_layer")
        self.in_scope_push = check_push(self.in_scope_push, self.gate_layer)
        if self.in_scope_push and self.vector is None:
            raise ValueError("in_scope_push reverses the refusal vector: it needs the vector")

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        if self.fixed_gate is None:
            return super().prepare(handle, enc)
        rows = torch.full((enc["input_ids"].shape[0],), float(self.fixed_gate))
        self.calibrator.set_gate_override({l: rows for l in self.layers})

    def validate(self, handle: ModelHandle) -> None:
        self.calibrator.check_compatible(handle.n_layers, handle.hidden_size)  # the model mismatch first
        super().validate(handle)

    @property
    def gate_read_layers(self) -> tuple[int, ...]:
        """The gate layer and ``gate_extra_layers``, ascending: their last-prompt-token states, concatenated, are the
        gate's input."""
        return () if self.gate_layer is None else tuple(sorted({int(self.gate_layer), *self.gate_extra_layers}))

    def gate_values(self, summary: torch.Tensor) -> dict[int, torch.Tensor]:
        """``layer → [batch]`` gate values of prefill summaries ``[batch, d]``, rounded at 0.5 with ``hard_gate``."""
        values = self.calibrator.gate_values(summary)
        return {l: (v > 0.5).to(v.dtype) for l, v in values.items()} if self.hard_gate else values

    def set_gate(self, summary: torch.Tensor) -> None:
        self.calibrator.set_gate_override(self.gate_values(summary))

    def clear_gate(self) -> None:
        self.calibrator.clear_gate_override()

    @property
    def shares_prompt_pass(self) -> bool:
        return super().shares_prompt_pass and self.fixed_gate is None  # a fixed gate reads nothing

    def steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out = self.calibrator.apply_hidden(layer, hidden)
        return self.pushed(layer, out, self.calibrator.gate_override_rows(layer)) if self.in_scope_push else out

    def pushed(self, layer: int, x: torch.Tensor, rho: torch.Tensor | None) -> torch.Tensor:
        """``x − β·(1 − ρ)·v_layer`` per row (``rho`` ``[batch]``, the prefill gate's values; ``None``: no prefill gate
        set, ``x`` itself): the in-scope push (:attr:`in_scope_push`)."""
        if not self.in_scope_push or rho is None:
            return x
        v = self.vector.directions[layer].to(x.device, x.dtype)
        weight = (1 - rho.to(x.device, x.dtype)).reshape(-1, *([1] * (x.ndim - 1)))
        return x - self.in_scope_push * weight * v

    @torch.no_grad()
    def gate(self, handle: ModelHandle, samples: Sequence[Sample], batch_size: int = 8) -> torch.Tensor:
        """Mean gate value ρ over the steered layers for each sample (read at the last prompt token)."""
        return self.calibrated_states(handle, samples, batch_size=batch_size)[2].mean(1)

    @torch.no_grad()
    def calibrated_states(self, handle: ModelHandle, samples: Sequence[Sample], batch_size: int = 8,
                          cache_dir: bool | str | Path | None = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last-prompt-token states of the steered layers before and after the calibrator, and the gate.

        Each layer's state is read from the unsteered model and calibrated on its own (the calibrator's effect at
        that layer, not the knock-on effect of steering the layers below). Returns ``(original [n, L, d],
        calibrated [n, L, d], rho [n, L])`` with ``L = len(self.layers)``; ``fixed_gate`` is honoured. ``cache_dir``:
        the activation cache (:func:`~crvlm_core.extract.extract`'s).
        """
        read = sorted(set(self.layers) | set(self.gate_read_layers))
        acts = extract(handle, samples, layers=read, batch_size=batch_size, cache_dir=cache_dir, progress=False)
        original = torch.stack([acts.at(l) for l in self.layers], dim=1).float()
        if self.fixed_gate is not None:
            rho = torch.full(original.shape[:2], float(self.fixed_gate))
            with self.calibrator.gate_override({l: rho[:, j] for j, l in enumerate(self.layers)}):
                calibrated = torch.stack([self.pushed(l, self.calibrator(original[:, j], l)[0], rho[:, j])
                                          for j, l in enumerate(self.layers)], 1)
            return original, calibrated, rho
        if self.gate_layer is None:
            outs = [self.calibrator(original[:, j], l) for j, l in enumerate(self.layers)]
        else:  # the prefill gate as generation sets it (hard_gate honoured)
            summary = torch.cat([acts.at(l).float() for l in self.gate_read_layers], dim=-1)
            with self.calibrator.gate_override(self.gate_values(summary)):
                outs = [self.calibrator(original[:, j], l) for j, l in enumerate(self.layers)]
            outs = [(self.pushed(l, x, rho.reshape(-1)), rho, d) for l, (x, rho, d) in zip(self.layers, outs)]
        return original, torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)

    def write_files(self, folder: str | Path) -> Path:
        """Write the artifact's files into ``folder`` (no manifest): what :meth:`save` writes, and how a parent
        artifact (a policy) nests a calibrated steering in a sub-folder; :meth:`read_files` reads them back."""
        folder = Path(folder)
        self.calibrator.save(folder)
        atomic_write_json(folder / CRVLM_JSON, {
            "layers": list(self.layers), "gate_layer": self.gate_layer, "fixed_gate": self.fixed_gate,
            "gate_pass": self.gate_pass, "hard_gate": self.hard_gate, "gate_extra_layers": list(self.gate_extra_layers),
            "in_scope_push": self.in_scope_push,
            "config": None if self.config is None else self.config.to_dict(), "info": self.info})
        if self.history:
            write_history(folder / TRAIN_LOG, self.history)
        if self.vector is not None:
            self.vector.write_files(folder / VECTOR_DIR)
        return folder

    @classmethod
    def read_files(cls, folder: str | Path) -> "CalibratedSteering":
        """Read what :meth:`write_files` wrote (no manifest check: :func:`load_calibrated`, or a parent artifact's
        loader, has checked the hashes first)."""
        folder = Path(folder)
        meta = json.loads((folder / CRVLM_JSON).read_text(encoding="utf-8"))
        vector = SteeringVector.read_files(folder / VECTOR_DIR) if (folder / VECTOR_DIR).is_dir() else None
        log = folder / TRAIN_LOG
        history = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.is_file() else []
        config = CrvlmConfig(**{"gate_pass": "separate", **meta["config"]}) if meta.get("config") else None
        return cls(Calibrator.load(folder), tuple(meta["layers"]), meta["gate_layer"], meta["info"], vector,
                   meta["fixed_gate"], config, history, meta.get("gate_pass", "separate"),  # older: separate
                   bool(meta.get("hard_gate", False)),  # older artifacts: the soft gate
                   tuple(meta.get("gate_extra_layers", ())),  # older: the gate layer alone
                   float(meta.get("in_scope_push", 0.0)))  # older: in-scope states left alone

    def save(self, folder: str | Path, *, force: bool = False, extra_json: dict | None = None) -> Path:
        """Write the artifact folder whole (see the module docstring); ``extra_json`` maps more file names to JSON
        objects written into it (the CLI's ``fit.json``).

        Raises:
            ArtifactExists: ``folder`` is not empty and ``force`` is false (nothing is written).
        """
        cal = self.calibrator
        config = {"layers": list(self.layers), "gate_layer": self.gate_layer, "fixed_gate": self.fixed_gate,
                  "gate_pass": self.gate_pass, "hard_gate": self.hard_gate,
                  "gate_extra_layers": list(self.gate_extra_layers), "in_scope_push": self.in_scope_push,
                  "calibrator": cal.config.to_dict(),
                  "fit": None if self.config is None else self.config.to_dict()}
        n_layers = cal.n_model_layers if cal.n_model_layers is not None or self.vector is None else self.vector.n_layers
        model = {"spec": cal.model_spec, "key": self.info.get("model_key", cal.model_spec),
                 "hidden_size": cal.hidden_size, "n_layers": n_layers}
        inputs = {"data": cal.data_fingerprint, "vector": cal.vector_fingerprint, "fit": config["fit"]}
        return write_artifact(folder, KIND, self.write_files, config=config, model=model, inputs=inputs,
                              force=force, extra_json=extra_json)


def load_calibrated(folder: str | Path, handle: ModelHandle | None = None) -> CalibratedSteering:
    """Load what :meth:`CalibratedSteering.save` wrote, after checking every file's hash; with ``handle``, also that
    the artifact was fitted on a model of its shape.

    Raises:
        ArtifactError: not a ``crvlm`` artifact, a damaged or incomplete folder, or one fitted on another model.
    """
    manifest = read_manifest(folder, kinds=(KIND,))
    if handle is not None and manifest["model"].get("n_layers") is not None:
        check_model(manifest, handle, folder)
    steering = CalibratedSteering.read_files(folder)
    if handle is not None:
        steering.validate(handle)
    return steering
