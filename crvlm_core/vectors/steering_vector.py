"""The fitted steering vector: per-layer directions plus how to apply them (layers, operation, strength), saved as
one ``kind="vector"`` artifact folder (``vector.safetensors`` + ``vector.json`` + ``artifact.json``).

A vector that is part of another artifact (CR-VLM and the baselines keep theirs in ``<folder>/vector/``) is written
with :meth:`SteeringVector.write_files` and read with :meth:`SteeringVector.read_files`: the same two files without
a manifest of their own (the parent's manifest hashes them).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

from crvlm_core.core.artifacts import check_model, read_manifest, write_artifact
from crvlm_core.core.errors import InputError
from crvlm_core.core.fields import index_list, number_field, set_field
from crvlm_core.core.io import atomic_save_safetensors, atomic_write_json, sha256_hex

__all__ = ["FORMAT_VERSION", "KIND", "OPERATIONS", "SteeringVector", "VECTOR_JSON", "VECTOR_SAFETENSORS", "load_vector"]

KIND = "vector"
"""Artifact kind of a saved vector (``artifact.json``'s ``kind``)."""
VECTOR_SAFETENSORS = "vector.safetensors"
"""File name of the directions tensor inside a saved vector's folder."""
VECTOR_JSON = "vector.json"
"""File name of the metadata (every field but the tensor) inside a saved vector's folder."""
FORMAT_VERSION = 1
"""Version of the vector files written by :meth:`SteeringVector.write_files`."""
OPERATIONS = ("add", "project_out")
"""Allowed values of :attr:`SteeringVector.operation`."""


def _tensor_digest(t: Tensor) -> str:
    t = t.detach().cpu().contiguous().to(torch.float32)
    return sha256_hex(str(tuple(t.shape)), t.numpy().tobytes())


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A fitted per-layer steering vector and how to apply it; saved as a ``vector`` artifact folder.

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
        set_field(self, "directions", d.detach().to(torch.float32))

        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a non-empty string, got {self.method!r}")
        if self.operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {OPERATIONS}, got {self.operation!r}")

        layers = list(index_list("layers", self.layers))  # accepts numpy / 0-d torch ints
        if not layers:
            raise InputError("layers must be non-empty")
        n_layers = d.shape[0]
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise InputError(f"layers {bad} out of range: the vector has {n_layers} layers (0..{n_layers-1})")
        if len(set(layers)) != len(layers):
            raise InputError(f"layers contains duplicates: {layers}")
        set_field(self, "layers", sorted(layers))
        number_field(self, "alpha")
        set_field(self, "normalized", bool(self.normalized))
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

    def artifact_config(self) -> dict:
        """The settings recorded as the artifact's ``config``: how the vector is applied and what fitted it."""
        return {"method": self.method, "layers": list(self.layers), "operation": self.operation, "alpha": self.alpha,
                "normalized": self.normalized, "positions": self.positions, "hook_site": self.hook_site,
                "extra": copy.deepcopy(self.extra)}

    def write_files(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/vector.safetensors`` and ``folder/vector.json`` (no manifest): the files of :meth:`save`,
        and how a parent artifact nests a vector in a sub-folder. Byte-identical for the same vector.

        The tensor is written first and the JSON last, and the JSON records the tensor's SHA-256, so a crash
        between the two writes is detected by :meth:`read_files` instead of pairing stale metadata with a new
        tensor. The safetensors header holds one metadata entry (canonical JSON): safetensors writes several
        entries in an order that varies between processes.
        """
        folder = Path(folder)
        header = json.dumps({"format_version": FORMAT_VERSION, "method": self.method}, sort_keys=True)
        atomic_save_safetensors(folder / VECTOR_SAFETENSORS, {"directions": self.directions},
                                metadata={"crvlm_vector": header})
        atomic_write_json(folder / VECTOR_JSON, self.to_json_dict())
        return folder

    def save(self, folder: str | os.PathLike, *, force: bool = False, extra_json: dict | None = None) -> Path:
        """Save as one ``kind="vector"`` artifact folder, written whole
        (:func:`crvlm_core.core.artifacts.write_artifact`).

        Args:
            folder: The artifact folder; must be absent or empty unless ``force``.
            force: Replace an existing folder whole.
            extra_json: File name → JSON object written into the folder too (the CLI's ``fit.json``).

        Returns:
            ``folder`` as a :class:`~pathlib.Path`.

        Raises:
            crvlm_core.core.artifacts.ArtifactExists: ``folder`` holds something and ``force`` is false.
        """
        model = {"spec": self.model_spec, "key": self.model_spec, "hidden_size": self.hidden_size,
                 "n_layers": self.n_layers}
        inputs = {"extraction": self.fingerprint, "method": self.method, "extra": self.extra}
        return write_artifact(folder, KIND, self.write_files, config=self.artifact_config(), model=model,
                              inputs=inputs, force=force, extra_json=extra_json)

    @classmethod
    def load(cls, folder: str | os.PathLike, handle=None) -> "SteeringVector":
        """Read a vector written by :meth:`save` (see :func:`load_vector`)."""
        return load_vector(folder, handle)

    @classmethod
    def read_files(cls, folder: str | os.PathLike) -> "SteeringVector":
        """Read the files :meth:`write_files` wrote into ``folder`` (no manifest check: a parent artifact's
        loader has checked its own manifest first).

        Raises:
            FileNotFoundError: If the folder or either file is missing.
            ValueError: If the format version is unknown or the JSON does not match the tensor.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        paths = {name: folder / name for name in (VECTOR_JSON, VECTOR_SAFETENSORS)}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"not a saved steering vector: missing {', '.join(missing)} "
                f"(SteeringVector.write_files writes {VECTOR_SAFETENSORS} and {VECTOR_JSON})"
            )
        meta = json.loads(paths[VECTOR_JSON].read_text(encoding="utf-8"))
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{paths[VECTOR_JSON]}: unsupported format_version {version!r} (expected {FORMAT_VERSION})"
            )
        directions = load_file(paths[VECTOR_SAFETENSORS]).get("directions")
        if directions is None:
            raise ValueError(f"{paths[VECTOR_SAFETENSORS]}: no 'directions' tensor")
        if directions.ndim != 2 or (meta.get("n_layers"), meta.get("hidden_size")) != tuple(directions.shape):
            raise ValueError(
                f"{folder}: {VECTOR_JSON} says {meta.get('n_layers')} layers x {meta.get('hidden_size')} "
                f"but {VECTOR_SAFETENSORS} holds shape {tuple(directions.shape)}"
            )
        digest = meta.get("directions_sha256")
        if digest is not None and digest != _tensor_digest(directions):
            raise ValueError(
                f"{folder}: {VECTOR_SAFETENSORS} does not match {VECTOR_JSON} (sha256 differs); "
                "was a save interrupted? Re-save the vector."
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"directions"}
        return cls(directions=directions, **{k: v for k, v in meta.items() if k in names})


def load_vector(folder: str | os.PathLike, handle=None) -> SteeringVector:
    """The vector saved in the artifact folder ``folder`` by :meth:`SteeringVector.save`, after
    :func:`~crvlm_core.core.artifacts.read_manifest` has checked every file's hash and, given a model ``handle``,
    that it has the hidden size and layer count the vector was fitted on.

    Raises:
        crvlm_core.core.artifacts.ArtifactError: One line: no folder, no or a broken manifest, another kind, a
            missing or changed file, or another model's shape.
    """
    manifest = read_manifest(folder, kinds=(KIND,))
    if handle is not None:
        check_model(manifest, handle, folder)
    return SteeringVector.read_files(folder)
