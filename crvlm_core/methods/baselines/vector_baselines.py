"""The baselines that add a refusal vector — ``persona`` (prompt-based vector), ``actadd`` (teacher-forced vector),
both unconditional, and ``cast`` (the teacher-forced vector behind a condition) — fitted, written and read back."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from crvlm_core.core.io import atomic_save_safetensors
from crvlm_core.data.schema import Sample
from crvlm_core.methods.baselines.cast import ConditionalSteering, fit_cast
from crvlm_core.methods.baselines.config import BaselineConfig
from crvlm_core.methods.refusal_vectors import VectorConfig, fit_vector
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.interventions import from_vector
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["CONDITION_FILE", "VECTOR_DIR", "fit_vector_baseline", "read_vector_baseline", "write_vector_baseline"]

#: Sub-folder of a baseline artifact holding its refusal vector; CAST's condition file beside it.
VECTOR_DIR = "vector"
CONDITION_FILE = "condition.safetensors"


def fit_vector_baseline(handle: ModelHandle, train: Sequence[Sample], config: BaselineConfig,
                        progress: bool = True) -> tuple[SteeringVector, Intervention, dict]:
    """Fit the refusal vector of ``config.method`` (and CAST's condition). Returns ``(vector, intervention, info)``,
    ``info`` being what ``baseline.json`` records of them."""
    method = "prompt-based" if config.method == "persona" else "teacher-forced"
    vector = fit_vector(handle, train, VectorConfig(method, layers=config.layers, alpha=config.alpha,
                                                    batch_size=config.batch_size), progress=progress)
    info = dict(layers=list(vector.layers), alpha=vector.alpha, vector_method=vector.method,
                fingerprint=vector.fingerprint)
    if config.method != "cast":
        return vector, from_vector(vector), info
    cast, search = fit_cast(handle, train, vector, config.condition_layers, config.batch_size, config.seed, progress,
                            gate_pass=config.gate_pass)
    info.update(condition_layer=cast.gate_layer, threshold=cast.threshold, gate_pass=cast.gate_pass,
                train_condition_mb=search["mb"], grid=search["table"])
    return vector, cast, info


def write_vector_baseline(folder: Path, vector: SteeringVector, intervention: Intervention) -> None:
    """Write the vector into ``folder/vector/`` and, for CAST, its condition and centre beside it."""
    vector.write_files(folder / VECTOR_DIR)
    if isinstance(intervention, ConditionalSteering):
        atomic_save_safetensors(folder / CONDITION_FILE, {"condition": intervention.condition,
                                                          "center": intervention.center})


def read_vector_baseline(folder: Path, method: str, info: dict, alpha: float | None = None,
                         layers: Sequence[int] | None = None) -> tuple[SteeringVector, Intervention]:
    """The vector and intervention :func:`write_vector_baseline` wrote (``alpha`` / ``layers`` override the
    saved strength / layers)."""
    vector = SteeringVector.read_files(folder / VECTOR_DIR)
    if method != "cast":
        return vector, from_vector(vector, alpha=alpha, layers=layers)
    from safetensors.torch import load_file

    cond = load_file(str(folder / CONDITION_FILE))
    return vector, ConditionalSteering(
        vector.directions, tuple(layers if layers is not None else vector.layers),
        vector.alpha if alpha is None else alpha, condition=cond["condition"], center=cond["center"],
        gate_layer=info["condition_layer"], threshold=info["threshold"],
        gate_pass=info.get("gate_pass", "separate"))  # artifacts written before gate_pass: separate
