"""A fitted baseline — what to generate with (a model handle, interventions, a system prompt) — and its artifact
folder: ``artifact.json`` (kind ``baseline``, ``config.method`` says which) + ``baseline.json`` + the vector, CAST's
condition or the LoRA adapter, written whole by :meth:`Baseline.save` and read back by :func:`load_baseline`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from crvlm_core.core.artifacts import check_model, read_manifest, write_artifact
from crvlm_core.core.errors import InputError
from crvlm_core.core.io import atomic_write_bytes, atomic_write_json
from crvlm_core.methods.baselines.config import VECTOR_METHODS, BaselineConfig
from crvlm_core.methods.baselines.lora import load_adapter
from crvlm_core.methods.baselines.vector_baselines import read_vector_baseline, write_vector_baseline
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["ADAPTER_DIR", "BASELINE_JSON", "KIND", "Baseline", "load_baseline"]

KIND = "baseline"
BASELINE_JSON = "baseline.json"
ADAPTER_DIR = "lora_adapter"


@dataclass
class Baseline:
    """A fitted method ready to generate with: ``handle`` (the adapted copy for ``lora``), ``interventions`` and
    ``system`` go straight to :func:`~crvlm_core.evaluation.evaluate`. ``info`` is what
    ``baseline.json`` holds. A fitted or loaded baseline also carries what :meth:`save` writes: its ``config``, the
    refusal ``vector``, the LoRA ``adapter`` files, the base ``model`` (:func:`~crvlm_core.core.artifacts.model_info`)
    and the ``inputs`` fingerprint."""

    method: str
    handle: ModelHandle | None
    interventions: list[Intervention] = field(default_factory=list)
    system: str | None = None
    info: dict = field(default_factory=dict)
    config: BaselineConfig | None = None
    vector: SteeringVector | None = None
    adapter: dict[str, bytes] | None = field(default=None, repr=False)
    model: dict | None = None
    inputs: dict | str | None = None

    @property
    def layers(self) -> list[int]:
        return sorted({l for iv in self.interventions for l in iv.layers})

    def save(self, folder: str | Path, *, force: bool = False, extra_json: dict[str, Any] | None = None) -> Path:
        """Write the artifact folder whole (see :func:`~crvlm_core.core.artifacts.write_artifact`).

        Raises:
            ArtifactExists: ``folder`` holds something and ``force`` is false.
        """
        if self.config is None or self.model is None:
            raise InputError(f"the {self.method} baseline was not fitted by fit_baseline: nothing to save")

        def write_files(tmp: Path) -> None:
            atomic_write_json(tmp / BASELINE_JSON, self.info)
            if self.vector is not None:
                write_vector_baseline(tmp, self.vector, self.interventions[0])
            for name, data in (self.adapter or {}).items():
                atomic_write_bytes(tmp / ADAPTER_DIR / name, data)

        return write_artifact(folder, KIND, write_files, config=self.config.to_dict(), model=self.model,
                              inputs=self.inputs or {}, force=force, extra_json=extra_json)


def load_baseline(folder: str | Path, handle: ModelHandle, alpha: float | None = None,
                  layers: Sequence[int] | None = None) -> Baseline:
    """Load what :meth:`Baseline.save` wrote, for ``handle``'s model (``lora``: a merged copy of it).
    ``alpha`` / ``layers`` override a vector method's strength / layers.

    Raises:
        ArtifactError: not a baseline artifact, damaged, or fitted on a model of another shape.
        InputError: ``alpha`` / ``layers`` given for a baseline without a vector.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, kinds=(KIND,))
    check_model(manifest, handle, folder)
    config = BaselineConfig(**manifest["config"])
    method = config.method
    if (alpha is not None or layers is not None) and method not in VECTOR_METHODS:
        raise InputError(f"--layers/--alpha do not apply to the {method} baseline")
    info = json.loads((folder / BASELINE_JSON).read_text(encoding="utf-8"))
    kept = dict(info=info, config=config, model=manifest["model"], inputs=manifest["inputs"])
    if method == "system-prompt":
        return Baseline(method, handle, [], info["system"], **kept)
    if method == "lora":
        adapter = {p.relative_to(folder / ADAPTER_DIR).as_posix(): p.read_bytes()
                   for p in sorted((folder / ADAPTER_DIR).rglob("*")) if p.is_file()}
        return Baseline(method, load_adapter(handle, folder / ADAPTER_DIR), [], None, adapter=adapter, **kept)
    vector, iv = read_vector_baseline(folder, method, info, alpha, layers)
    vector.check_compatible(handle.n_layers, handle.hidden_size)
    iv.validate(handle)
    return Baseline(method, handle, [iv], None, vector=vector, **kept)
