"""The model names ``crvlm serve`` answers to: ``<spec>`` for the plain model and ``<spec>:steered`` for the
model steered by an artifact folder, loaded through the one artifact registry (:mod:`crvlm_core.methods.loading`)."""

from __future__ import annotations

from pathlib import Path

from crvlm_core.methods.loading import load_interventions
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention

__all__ = ["STEERED_SUFFIX", "load_variants"]

STEERED_SUFFIX = ":steered"


def load_variants(handle: ModelHandle, artifact: str | Path | None = None) -> dict[str, list[Intervention]]:
    """Served names: ``<spec>`` → unsteered and, with an artifact folder (a vector, a CR-VLM calibrator, a vector
    baseline, a refusal-steering vector or a fitted policy), ``<spec>:steered`` → its interventions.

    Raises:
        ArtifactError: the folder is damaged, not an artifact, or fitted on a model of another shape.
        InputError: the artifact is a system prompt or adapted weights, not interventions.
    """
    variants: dict[str, list[Intervention]] = {handle.spec: []}
    if artifact is not None:
        variants[handle.spec + STEERED_SUFFIX] = load_interventions(Path(artifact), handle)
    return variants
