"""The intervention interface: something that rewrites the output of some decoder layers, and the per-row prefill
gate shared by the gated interventions (CR-VLM's calibrator, CAST, composed policies)."""

from __future__ import annotations

import torch

from crvlm_core.extract import read_last_token
from crvlm_core.models.handle import ModelHandle

__all__ = ["GATE_PASSES", "Intervention", "PrefillGate"]

#: How a prefill gate is read (:class:`PrefillGate`).
GATE_PASSES = ("separate", "shared")


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
    """Per-row prefill gating, shared by the gated interventions: the last prompt token's state at ``gate_layer``
    (at each of :attr:`gate_read_layers`, concatenated) is handed to :meth:`set_gate` as a ``[batch, d]`` summary;
    the gate so fixed holds for every steered position of the batch, and :meth:`release` clears it. Subclasses
    implement ``set_gate``/``clear_gate`` and :meth:`steer`.

    ``gate_pass`` says how the gate is read and which positions are steered:

    - ``"separate"``: :meth:`prepare` runs one unsteered prompt pass (up to the gate layer) to read the gate, then
      the steered pass steers every prompt position and every generated token. Two prompt passes per batch.
    - ``"shared"``: steering starts at the prompt's last token. The prompt before it is read unsteered, so one
      unsteered prompt pass gives both the gate and the key/value cache the steered generation continues from
      (:func:`crvlm_core.steer.prefill.shared_prompt_pass`; the last prompt token is computed again, steered): the
      cost of plain generation plus one token. Where no shared pass runs (the nnsight backend, full-sequence logits),
      :meth:`prepare` reads the gate in its own pass and :meth:`apply` steers the same positions, so every backend
      gives the same result.
    """

    gate_layer: int | None = None
    gate_pass: str = "separate"

    @property
    def shares_prompt_pass(self) -> bool:
        """Whether a shared prompt pass can set this gate (``gate_pass == "shared"`` and a gate layer to read)."""
        return self.gate_pass == "shared" and self.gate_layer is not None

    @property
    def gate_read_layers(self) -> tuple[int, ...]:
        """The layers whose last-prompt-token states, concatenated in this (ascending) order, are the summary handed
        to :meth:`set_gate`: the gate layer alone unless a subclass reads more."""
        return () if self.gate_layer is None else (int(self.gate_layer),)

    def gate_summary(self, handle: ModelHandle, enc: dict) -> torch.Tensor:
        """``[batch, len(gate_read_layers) · d]``: the unsteered summary of prepared inputs (one forward)."""
        return read_last_token(handle, enc, list(self.gate_read_layers)).flatten(1)

    def set_gate(self, summary: torch.Tensor) -> None:
        raise NotImplementedError

    def clear_gate(self) -> None:
        raise NotImplementedError

    def steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The gated update of the positions this gate steers (``[batch, seq, d]``)."""
        raise NotImplementedError

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self.gate_pass != "shared" or hidden.shape[1] <= 1:
            return self.steer(layer, hidden)
        out = hidden.clone()  # a prompt pass with the shared gate: only the last prompt token is steered
        out[:, -1:] = self.steer(layer, hidden[:, -1:])
        return out

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        if self.gate_pass not in GATE_PASSES:
            raise ValueError(f"gate_pass must be one of {GATE_PASSES}, got {self.gate_pass!r}")
        for layer in self.gate_read_layers:
            handle.check_layer(layer)

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        if self.gate_layer is not None:
            self.set_gate(self.gate_summary(handle, enc))

    def release(self) -> None:
        self.clear_gate()
