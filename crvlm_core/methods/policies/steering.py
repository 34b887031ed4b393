"""The ``composed`` design at generation: every refusing constraint's CR-VLM calibrator and every allowing
constraint's gate head read the same prefill summary, and :func:`compose_gates` turns their gates into the policy's."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from crvlm_core.models.handle import ModelHandle
from crvlm_core.methods.policies.spec import Policy, compose_gates
from crvlm_core.steer.base import PrefillGate

__all__ = ["PolicySteering"]


class PolicySteering(PrefillGate):
    """Design ``composed``: refusing calibrators and allowing gate heads on one prefill summary, combined by
    :func:`compose_gates`. ``last_gates`` keeps the raw and composed gate values of the last batch."""

    def __init__(self, policy: Policy, calibrators: Mapping[str, Any], heads: Mapping[str, torch.nn.Linear],
                 gate_layer: int):
        self.policy = policy
        self.steerings = dict(calibrators)  # name → CalibratedSteering
        self.calibrators = torch.nn.ModuleDict({n: s.calibrator for n, s in calibrators.items()})
        self.heads = torch.nn.ModuleDict(dict(heads))
        self.gate_layer = int(gate_layer)
        self.rule = tuple((c.name, c.action, c.priority) for c in policy.constraints)
        self.layers = tuple(sorted({l for s in calibrators.values() for l in s.layers}))
        if any(s.gate_layer != self.gate_layer for s in calibrators.values()):
            raise ValueError("every refusing calibrator of a composed policy must read the same gate layer")
        self.last_gates: dict[str, torch.Tensor] = {}

    def validate(self, handle: ModelHandle) -> None:
        for s in self.steerings.values():
            s.validate(handle)
        super().validate(handle)

    @torch.no_grad()
    def gates(self, summary: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw gate value of every constraint for prefill summaries ``[batch, d]``."""
        rho = {}
        for name, s in self.steerings.items():
            rho[name] = torch.stack(list(s.calibrator.gate_values(summary).values())).mean(0)
        for name, head in self.heads.items():
            rho[name] = torch.sigmoid(head(summary.to(head.weight.dtype))).squeeze(-1)
        return rho

    def set_gate(self, summary: torch.Tensor) -> None:
        rho = self.gates(summary)
        composed = compose_gates(self.policy, rho)
        self.last_gates = {**{f"raw:{k}": v for k, v in rho.items()}, **{f"composed:{k}": v for k, v in composed.items()}}
        for name, s in self.steerings.items():
            s.calibrator.set_gate_override({l: composed[name].clamp(0, 1) for l in s.layers})

    def clear_gate(self) -> None:
        for s in self.steerings.values():
            s.calibrator.clear_gate_override()

    def steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        for s in self.steerings.values():
            if layer in s.layers:
                hidden = s.calibrator.apply_hidden(layer, hidden)
        return hidden
