"""The intervention interface: something that rewrites the output of some decoder layers, and the per-row prefill
gate shared by the gated interventions (CR-VLM's calibrator, CAST)."""

from __future__ import annotations

import torch

from crvlm_core.extract import read_last_token
from crvlm_core.models.handle import ModelHandle

__all__ = ["Intervention", "PrefillGate"]


class Intervention:
    """Something that rewrites the output of some decoder layers. Subclasses implement :meth:`apply`."""

    layers: tuple[int, ...] = ()

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:  # [batch, seq, d] → [batch, seq, d]
        raise NotImplementedError

    def validate(self, handle: ModelHandle) -> None:
        for layer in self.layers:
            handle.check_layer(layer)

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        """Called before each batch's forward/generation with its inputs (e.g. prefill gating reads the prompt)."""

    def release(self) -> None:
        """Called after each batch (undo what :meth:`prepare` set)."""


class PrefillGate(Intervention):
    """Per-row prefill gating, shared by the gated interventions (the CR-VLM calibrator, CAST): with ``gate_layer``
    set, :meth:`prepare` runs one unsteered prompt pass per batch, reads the last prompt token at that layer and
    hands the ``[batch, d]`` summary to :meth:`set_gate`; the gate so fixed holds for the prompt pass and every
    generated token of the batch, and :meth:`release` clears it. Subclasses implement ``set_gate``/``clear_gate``."""

    gate_layer: int | None = None

    def set_gate(self, summary: torch.Tensor) -> None:
        raise NotImplementedError

    def clear_gate(self) -> None:
        raise NotImplementedError

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        if self.gate_layer is not None:
            handle.check_layer(self.gate_layer)

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        if self.gate_layer is not None:
            self.set_gate(read_last_token(handle, enc, [self.gate_layer])[:, 0])

    def release(self) -> None:
        self.clear_gate()
