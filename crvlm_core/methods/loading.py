"""The registry ``kind → loader`` and :func:`load_artifact`: one way for the CLI, the server and notebooks to turn
an artifact folder (``crvlm fit --out``) into what generation needs — a model handle, interventions, a system prompt.

:func:`load_artifact` verifies the folder first (``read_manifest``: every file's SHA-256, the format version) and
that it belongs to the model's shape (``check_model``), then asks the loader of the folder's ``kind``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from crvlm_core.core.artifacts import ArtifactError, check_model, read_manifest
from crvlm_core.core.errors import InputError
from crvlm_core.methods.baselines.artifact import load_baseline
from crvlm_core.methods.crvlm.calibrated import load_calibrated
from crvlm_core.methods.policies.artifact import load_policy_steering
from crvlm_core.methods.refusal_steering.artifact import load_refusal_steering
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.interventions import from_vector
from crvlm_core.vectors.steering_vector import load_vector

__all__ = ["LOADERS", "LoadedArtifact", "load_artifact", "load_interventions"]


@dataclass
class LoadedArtifact:
    """What an artifact gives generation: the ``handle`` to generate with (an adapted copy for a LoRA baseline,
    else the handle given), its ``interventions``, a ``system`` prompt or None, and the verified ``manifest``."""

    handle: ModelHandle
    interventions: list[Intervention] = field(default_factory=list)
    system: str | None = None
    manifest: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "")


def _no_overrides(kind: str, alpha: float | None, layers: Sequence[int] | None) -> None:
    if alpha is not None or layers is not None:
        raise InputError(f"--layers/--alpha do not apply to a {kind} artifact (they override a vector's)")


def _vector(folder: Path, handle: ModelHandle, alpha, layers) -> LoadedArtifact:
    return LoadedArtifact(handle, [from_vector(load_vector(folder, handle), alpha=alpha, layers=layers)])


def _refusal_steering(folder: Path, handle: ModelHandle, alpha, layers) -> LoadedArtifact:
    return LoadedArtifact(handle, list(load_refusal_steering(folder, handle, alpha=alpha, layers=layers)))


def _crvlm(folder: Path, handle: ModelHandle, alpha, layers) -> LoadedArtifact:
    _no_overrides("CR-VLM calibrator", alpha, layers)
    return LoadedArtifact(handle, [load_calibrated(folder, handle)])


def _baseline(folder: Path, handle: ModelHandle, alpha, layers) -> LoadedArtifact:
    b = load_baseline(folder, handle, alpha, layers)
    return LoadedArtifact(b.handle, list(b.interventions), b.system)


def _policy(folder: Path, handle: ModelHandle, alpha, layers) -> LoadedArtifact:
    _no_overrides("policy", alpha, layers)
    return LoadedArtifact(handle, [load_policy_steering(folder, handle)])


def _safetensor_error() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors: its error is the rust module's
        return ()
    return (SafetensorError,)


#: What a loader raises on files of the wrong shape (JSON of another structure, a damaged tensor file).
_SHAPE_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError, OSError, *_safetensor_error())

#: ``kind`` (``artifact.json``) → ``loader(folder, handle, alpha, layers) -> LoadedArtifact``.
LOADERS: dict[str, Callable[..., LoadedArtifact]] = {
    "vector": _vector,
    "refusal-steering": _refusal_steering,
    "crvlm": _crvlm,
    "baseline": _baseline,
    "policy": _policy,
}


def load_artifact(folder: str | os.PathLike, handle: ModelHandle, alpha: float | None = None,
                  layers: Sequence[int] | None = None) -> LoadedArtifact:
    """Load any artifact folder for ``handle``'s model.

    Args:
        folder: a folder written by a method's ``save`` (``crvlm fit --out``).
        handle: the loaded model it is for; its hidden size and layer count must match the artifact's.
        alpha / layers: override a vector's strength / layers (vectors, refusal steering, vector baselines only).

    Raises:
        ArtifactError: one line: no artifact, damaged or incomplete, an unknown kind, fitted on another model, or
            files whose shape the loader cannot read (wrong JSON structure, a damaged tensor file).
        InputError: ``alpha`` / ``layers`` given for a kind they do not apply to.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, kinds=tuple(LOADERS))
    if (manifest.get("model") or {}).get("n_layers") is not None:  # the loaders check the rest of what they read
        check_model(manifest, handle, folder)
    try:
        loaded = LOADERS[manifest["kind"]](folder, handle, alpha, None if layers is None else list(layers))
    except InputError as err:  # a field of the folder's JSON out of range: name the folder when the loader did not
        if isinstance(err, ArtifactError) or str(folder) in str(err) or str(err).startswith("--"):  # "--": options
            raise
        raise ArtifactError(f"{folder}: {err}; re-fit it with --force") from None
    except _SHAPE_ERRORS as err:  # a consistent manifest over files of the wrong shape or content
        raise ArtifactError(f"{folder}: its {manifest['kind']} files cannot be read ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); re-fit it with --force") \
            from None
    loaded.manifest = manifest
    return loaded


def load_interventions(folder: str | os.PathLike, handle: ModelHandle, alpha: float | None = None,
                       layers: Sequence[int] | None = None) -> list[Intervention]:
    """The interventions of an artifact that steers ``handle`` itself (not a system prompt, not adapted weights),
    for code that serves or generates with plain interventions.

    Raises:
        InputError: the artifact is a system-prompt or LoRA baseline (evaluate it with ``crvlm eval --artifact``).
    """
    loaded = load_artifact(folder, handle, alpha, layers)
    if loaded.handle is not handle or loaded.system:
        raise InputError(f"{folder} is not an intervention (a system prompt or adapted weights): evaluate it with "
                         "`crvlm eval --artifact`")
    return loaded.interventions
