"""The saved form of a Refusal Steering fit: one ``refusal-steering`` artifact folder (the per-layer vector, its
topic gate when it has one, and its settings) written whole, and the loader that checks it and rebuilds its steering."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.artifacts import ArtifactError, check_model, read_manifest, write_artifact
from crvlm_core.methods.refusal_steering.gate import interventions_of
from crvlm_core.steer.base import Intervention
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["KIND", "TENSORS", "load_refusal_steering", "read_refusal_steering", "save_refusal_steering"]

KIND = "refusal-steering"
TENSORS = "vector.safetensors"
"""``directions`` [n_layers, d] and, for a gated fit, ``gate_direction`` [d]."""
_FIELDS = ("method", "layers", "operation", "alpha", "positions", "hook_site", "model_spec", "fingerprint")


def save_refusal_steering(vector: SteeringVector, folder: str | os.PathLike, *, model: dict, inputs: dict | str,
                          force: bool = False, extra_json: dict | None = None) -> Path:
    """Write ``vector`` (with its ``extra["gate"]``, if any) as one ``refusal-steering`` artifact folder.

    Raises:
        crvlm_core.core.artifacts.ArtifactExists: ``folder`` holds something and ``force`` is false.
    """
    extra = dict(vector.extra)
    gate = extra.pop("gate", None)
    tensors = {"directions": vector.directions.detach().float().contiguous()}
    if gate is not None:
        tensors["gate_direction"] = torch.tensor(gate["direction"], dtype=torch.float32)
    config = {**{f: getattr(vector, f) for f in _FIELDS}, "layers": list(vector.layers), "extra": extra,
              "gate": None if gate is None else {k: v for k, v in gate.items() if k != "direction"}}

    def write_files(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / TENSORS))

    return write_artifact(folder, KIND, write_files, config=config, model=model, inputs=inputs, force=force,
                          extra_json=extra_json)


def read_refusal_steering(folder: str | os.PathLike, handle=None) -> SteeringVector:
    """The fitted vector of a ``refusal-steering`` folder (its gate back in ``extra["gate"]``), after checking every
    hash and, given a model ``handle``, that it was fitted on a model of this shape.

    Raises:
        ArtifactError: one line: not such an artifact, damaged, or for another model.
    """
    from safetensors.torch import load_file

    manifest = read_manifest(folder, kinds=(KIND,))
    if handle is not None:
        check_model(manifest, handle, folder)
    tensors = load_file(str(Path(folder) / TENSORS))
    config = manifest["config"]
    extra = dict(config.get("extra") or {})
    if config.get("gate") is not None:
        if "gate_direction" not in tensors:
            raise ArtifactError(f"{folder}: the gate's direction is missing from {TENSORS}; re-fit it")
        extra["gate"] = {**config["gate"], "direction": [float(x) for x in tensors["gate_direction"]]}
    try:
        return SteeringVector(directions=tensors["directions"], extra=extra,
                              **{f: config[f] for f in _FIELDS if f in config})
    except (KeyError, ValueError) as err:
        raise ArtifactError(f"{folder}: not a usable refusal-steering vector ({err}); re-fit it") from None


def load_refusal_steering(folder: str | os.PathLike, handle=None, alpha: float | None = None,
                          layers: Sequence[int] | None = None) -> list[Intervention]:
    """The interventions of a ``refusal-steering`` folder (topic-gated when fitted with a gate); ``alpha`` /
    ``layers`` override the fitted ones."""
    return interventions_of(read_refusal_steering(folder, handle), alpha=alpha, layers=layers)
