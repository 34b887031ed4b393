"""The interventions on decoder-layer outputs, applied on every token (prompt and generated): add α·v, project out
v, or any callable on hidden states (the calibrator's hook point); built from a SteeringVector, fingerprinted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from crvlm_core.core.io import sha256_hex
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["AddVector", "HiddenStateFn", "ProjectOut", "from_vector", "intervention_fingerprint"]


def intervention_fingerprint(interventions: Sequence[Intervention]) -> str:
    """A digest of what the interventions do: class, layers, scalar settings, tensor values and module weights.

    Caches of steered results are keyed by it, so any change to a vector, a strength or a calibrator's weights
    gives another key. Bookkeeping attributes (dicts such as ``info``) are left out."""
    parts: list[bytes | str] = []
    for iv in interventions:
        parts.append(type(iv).__qualname__)
        for name, value in sorted(vars(iv).items()):
            if name.startswith("_"):
                continue
            if isinstance(value, torch.Tensor):
                parts += [name, value.detach().float().contiguous().numpy().tobytes()]
            elif isinstance(value, torch.nn.Module):
                for key, t in sorted(value.state_dict().items()):
                    parts += [f"{name}.{key}", t.detach().float().contiguous().numpy().tobytes()]
            elif isinstance(value, (int, float, str, bool, tuple, type(None))):
                parts.append(f"{name}={value!r}")
            elif isinstance(value, SteeringVector):
                parts.append(f"{name}={value.fingerprint}")
    return sha256_hex(*parts) if parts else "unsteered"


@dataclass
class _VectorIntervention(Intervention):
    """Shared parts of the per-layer vector interventions: ``vectors`` is ``[n_layers, d]`` (a row per model
    layer), applied at ``layers`` with strength ``alpha``."""

    vectors: torch.Tensor
    layers: tuple[int, ...]
    alpha: float = 1.0

    def __post_init__(self):
        self.layers = tuple(int(l) for l in self.layers)
        self.vectors = self.vectors.detach().float()

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        _check_shape(self.vectors, handle)


class AddVector(_VectorIntervention):
    """``h ← h + α·v[layer]`` at each of ``layers``."""

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.alpha * self.vectors[layer].to(hidden.device, hidden.dtype)


class ProjectOut(_VectorIntervention):
    """``h ← h − α·(h·v̂)v̂`` at each of ``layers`` (directional ablation; α=1 removes the component)."""

    def __post_init__(self):
        super().__post_init__()
        self.vectors = self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        u = self.vectors[layer].to(hidden.device, hidden.dtype)
        return hidden - self.alpha * (hidden @ u).unsqueeze(-1) * u


@dataclass
class HiddenStateFn(Intervention):
    """Any callable ``fn(layer, hidden) → hidden`` at ``layers`` (the calibrator plugs in here)."""

    fn: Callable[[int, torch.Tensor], torch.Tensor]
    layers: tuple[int, ...]

    def __post_init__(self):
        self.layers = tuple(int(l) for l in self.layers)

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.fn(layer, hidden)


def _check_shape(vectors: torch.Tensor, handle: ModelHandle) -> None:
    if vectors.ndim != 2 or vectors.shape != (handle.n_layers, handle.hidden_size):
        raise ValueError(f"steering vectors of shape {tuple(vectors.shape)} do not fit {handle.spec} "
                         f"({handle.n_layers} layers × hidden size {handle.hidden_size})")


def from_vector(vector: SteeringVector, alpha: float | None = None, layers: Sequence[int] | None = None) -> Intervention:
    """The intervention a saved :class:`SteeringVector` describes (its operation, layers and strength)."""
    alpha = vector.alpha if alpha is None else alpha
    layers = tuple(vector.layers if layers is None else layers)
    if vector.operation == "project_out":
        return ProjectOut(vector.directions, layers, alpha)
    return AddVector(vector.directions, layers, alpha)


