"""The topic gate of Refusal Steering: a mean-difference probe on the prompt's last token that opens the steering
only for one topic's prompts (gated removal, targeted induction), and the interventions of a fitted vector."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from crvlm_core.data.schema import Sample
from crvlm_core.extract import extract, read_last_token
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.interventions import AddVector, ProjectOut, from_vector
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["TopicGate", "TopicGatedAdd", "best_topic_gate", "interventions_of", "steering_interventions"]


class TopicGatedAdd(Intervention):
    """Targeted induction: ``h_l ← h_l + α·v_l`` at ``layers``, only for prompts the topic gate selects.

    The gate reads the unsteered prompt's last-token state at ``gate_layer`` (one extra forward per batch, in
    :meth:`prepare`) and opens a row when its projection on ``gate_direction`` exceeds ``threshold``.
    """

    def __init__(self, vectors: torch.Tensor, layers: Sequence[int], alpha: float, gate_layer: int,
                 gate_direction: torch.Tensor, threshold: float):
        self.vectors = vectors.detach().float()
        self.layers = tuple(int(l) for l in layers)
        self.alpha, self.gate_layer, self.threshold = float(alpha), int(gate_layer), float(threshold)
        g = gate_direction.detach().float().flatten()
        self.gate_direction = g / g.norm().clamp_min(1e-12)
        self._mask: torch.Tensor | None = None

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        handle.check_layer(self.gate_layer)

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        h = read_last_token(handle, enc, [self.gate_layer])[:, 0].float()
        self._mask = ((h @ self.gate_direction) > self.threshold).float()

    def release(self) -> None:
        self._mask = None

    def gate(self, handle: ModelHandle, prompts: Sequence[str]) -> list[bool]:
        """Which prompts the gate selects (for reporting)."""
        self.prepare(handle, handle.build_inputs(list(prompts)))
        out = [bool(x) for x in self._mask]
        self.release()
        return out

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("TopicGatedAdd.apply called outside prepare/release (use steered_generate)")
        m = self._mask.to(hidden.device, hidden.dtype)[:, None, None]
        return hidden + m * self.alpha * self.vectors[layer].to(hidden.device, hidden.dtype)


def _mean_diff_gate(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean difference ``a − b`` of two sets of states ``[n, d]``, the threshold halfway between the two classes'
    mean projections on it, and the training accuracy of ``projection > threshold ⇔ a``."""
    d = (a.double().mean(0) - b.double().mean(0))
    u = d / d.norm().clamp_min(1e-30)
    pa, pb = a.double() @ u, b.double() @ u
    thr = float((pa.mean() + pb.mean()) / 2)
    acc = float(((pa > thr).sum() + (pb <= thr).sum()) / (len(pa) + len(pb)))
    return d.float(), thr, acc


@dataclass
class TopicGate:
    """Where a topic gate reads (``layer``), its direction and threshold, and its training accuracy."""

    layer: int
    direction: torch.Tensor
    threshold: float
    accuracy: float

    def to_json(self) -> dict:
        return {"layer": self.layer, "threshold": self.threshold, "accuracy": self.accuracy,
                "direction": [float(x) for x in self.direction]}

    @classmethod
    def from_json(cls, d: dict) -> "TopicGate":
        return cls(int(d["layer"]), torch.tensor(d["direction"], dtype=torch.float32), float(d["threshold"]),
                   float(d.get("accuracy", float("nan"))))


def best_topic_gate(handle: ModelHandle, topic: Sequence[Sample], others: Sequence[Sample],
                    layers: Sequence[int] | None = None, batch_size: int = 8,
                    cache_dir: str | os.PathLike | bool | None = True) -> TopicGate:
    """The mean-difference topic gate (topic − others) at the candidate layer where it separates the training
    prompts best (ties: the earlier layer). One forward per batch reads every candidate layer. Default candidates:
    every layer from a quarter of the way up. ``cache_dir``: where the activations are cached (True:
    ``outputs/cache/``, keyed by the model and organism adapter; None: off)."""
    if not topic or not others:
        raise ValueError("a topic gate needs samples of the topic and of other subjects")
    layers = sorted({handle.check_layer(int(l)) for l in (layers if layers is not None
                                                           else range(handle.n_layers // 4, handle.n_layers))})
    a = extract(handle, list(topic), layers=layers, batch_size=batch_size, cache_dir=cache_dir, progress=False).acts
    b = extract(handle, list(others), layers=layers, batch_size=batch_size, cache_dir=cache_dir, progress=False).acts
    best = None
    for i, layer in enumerate(layers):
        d, thr, acc = _mean_diff_gate(a[:, i], b[:, i])
        if best is None or acc > best.accuracy + 1e-12:
            best = TopicGate(layer, d, thr, acc)
    return best


def steering_interventions(directions: torch.Tensor, layers: Sequence[int], alpha: float,
                           operation: str = "subtract", gate: TopicGate | None = None) -> list[Intervention]:
    """``subtract``: h_l ← h_l − α·v_l; ``project_out``: h_l ← h_l − α·(h_l·v̂_l)v̂_l; ``add``: h_l + α·v_l (induction).
    Applied at ``layers`` on every token (prompt and generated), batched (:mod:`crvlm_core.steer.interventions`).
    With a ``gate`` (``subtract`` / ``add`` only), only the prompts the topic gate selects are steered
    (:class:`TopicGatedAdd`)."""
    layers = tuple(int(l) for l in layers)
    if gate is not None:
        if operation not in ("subtract", "add"):
            raise ValueError(f"a topic gate works with subtract or add, not {operation!r}")
        signed = -float(alpha) if operation == "subtract" else float(alpha)
        return [TopicGatedAdd(directions, layers, signed, gate.layer, gate.direction, gate.threshold)]
    if operation == "subtract":
        return [AddVector(directions, layers, -float(alpha))]
    if operation == "add":
        return [AddVector(directions, layers, float(alpha))]
    if operation == "project_out":
        return [ProjectOut(directions, layers, float(alpha))]
    raise ValueError(f"unknown operation {operation!r}; choose subtract, project_out or add")


def interventions_of(vector: SteeringVector, alpha: float | None = None,
                     layers: Sequence[int] | None = None) -> list[Intervention]:
    """The interventions of a fitted vector: a topic-gated one when it carries ``extra["gate"]`` (a gated
    Refusal Steering fit), else :func:`crvlm_core.steer.interventions.from_vector`."""
    gate = (vector.extra or {}).get("gate")
    if gate is None:
        return [from_vector(vector, alpha=alpha, layers=layers)]
    g = TopicGate.from_json(gate)
    return [TopicGatedAdd(vector.directions, tuple(layers) if layers is not None else tuple(vector.layers),
                          float(vector.alpha if alpha is None else alpha), g.layer, g.direction, g.threshold)]
