"""What a baseline fit needs to know: the method (one of :data:`BASELINES`) and its settings, as one frozen,
self-validating :class:`BaselineConfig` (the ``crvlm fit --method <baseline>`` options map onto its fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crvlm_core.core.errors import InputError
from crvlm_core.core.fields import int_field, layers_field, number_field, set_field
from crvlm_core.methods.baselines.lora import LoraTrainConfig
from crvlm_core.steer.base import GATE_PASSES

__all__ = ["BASELINES", "VECTOR_METHODS", "BaselineConfig"]

#: method → one-line description (the ``crvlm fit --method`` names).
BASELINES: dict[str, str] = {
    "system-prompt": "no training: a system prompt states the scope and asks to refuse everything else",
    "persona": "prompt-based vector (refusal system prompt with vs without) added unconditionally",
    "actadd": "teacher-forced refusal vector added unconditionally (the over-refusal trap)",
    "cast": "conditional activation steering: the refusal vector added only to prompts whose last-token state at "
            "a condition layer has cosine > threshold with the out- minus in-scope condition vector (grid-searched "
            "on the training split)",
    "lora": "LoRA adapter fine-tuned on out-of-scope → a refusal, in-scope → the model's own unsteered answer",
}
#: The baselines that add a refusal vector (their ``layers`` / ``alpha`` apply, and can be overridden at load).
VECTOR_METHODS = ("persona", "actadd", "cast")


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of one baseline fit.

    Attributes:
        method: one of :data:`BASELINES`.
        in_scope: subjects the system prompt names (None: the in-scope subjects of the training data).
        layers / alpha: where and how strongly the refusal vector is added (persona, actadd, cast; None: a third
            of the way up).
        condition_layers: CAST's candidate condition layers (None: every layer but the first).
        gate_pass: how CAST's condition is read (:class:`~crvlm_core.steer.base.PrefillGate`): ``"separate"``
            (default) in a pass of its own, the vector added at every prompt token; ``"shared"`` in the one prompt
            pass, the vector added from the prompt's last token on (plain generation speed, but the vector alone
            refuses far less that way: R 0.88 → 0.54 on notebook 02's split, docs/results.md).
        lora_rank / lora_steps / lora_lr / lora_batch_size: the adapter's rank, optimiser steps, learning rate and
            batch size; ``lora_target_tokens``: the length of the in-scope answers it learns.
        batch_size: batch of the extraction and generation passes.
        seed: CAST's fold split, the adapter's initialisation and batch order.
    """

    method: str
    in_scope: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    alpha: float = 1.0
    condition_layers: tuple[int, ...] | None = None
    gate_pass: str = "separate"
    lora_rank: int = 8
    lora_steps: int = 48
    lora_lr: float = 5e-4
    lora_batch_size: int = 4
    lora_target_tokens: int = 24
    batch_size: int = 8
    seed: int = 42

    def __post_init__(self):
        if self.method not in BASELINES:
            raise InputError(f"unknown baseline {self.method!r}; choose from {', '.join(BASELINES)}")
        layers_field(self, "layers", prefix="baseline ", unique=False)
        layers_field(self, "condition_layers", prefix="baseline ", unique=False)
        if self.in_scope is not None:
            set_field(self, "in_scope", tuple(str(s) for s in self.in_scope) or None)
        number_field(self, "alpha", prefix="baseline ")
        if self.gate_pass not in GATE_PASSES:
            raise InputError(f"baseline gate_pass must be one of {GATE_PASSES}, got {self.gate_pass!r}")
        for name in ("lora_target_tokens", "batch_size"):
            int_field(self, name, prefix="baseline ")
        self.lora()  # validates the adapter's settings

    def lora(self) -> LoraTrainConfig:
        """The adapter's training settings (``lora`` only)."""
        try:
            return LoraTrainConfig(rank=self.lora_rank, steps=self.lora_steps, lr=self.lora_lr,
                                   batch_size=self.lora_batch_size, seed=self.seed)
        except ValueError as err:
            raise InputError(f"baseline {err}") from None

    def to_dict(self) -> dict:
        """JSON-able fields (``artifact.json``'s ``config``)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
