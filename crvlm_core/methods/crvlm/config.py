"""The settings of CR-VLM as frozen, self-validating dataclasses: the calibrator's architecture and training
(:class:`CalibratorConfig`), a whole fit on a model (:class:`CrvlmConfig`) and the behavioural fine-tune."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from crvlm_core.core.fields import int_field, layers_field, number_field, set_field
from crvlm_core.steer.base import GATE_PASSES

__all__ = ["BEHAVIOURAL_REFUSAL", "BehaviouralConfig", "CalibratorConfig", "CrvlmConfig", "GATE_FITS", "check_push"]

#: How the calibrator's gate is fitted: with the flow network (the paper), or alone first as a logistic probe.
GATE_FITS = ("joint", "probe")

#: The refusal the behavioural loss teaches out of scope (teacher-forced after the prompt).
BEHAVIOURAL_REFUSAL = "I'm sorry, but I can't assist with that."


def check_push(value, gate_layer) -> float:
    """An in-scope push strength (:attr:`CrvlmConfig.in_scope_push`): a finite number ≥ 0, and > 0 only with a prefill
    gate (it is scaled by ``1 − ρ`` of the prompt's gate)."""
    holder = type("Push", (), {"in_scope_push": value})()
    beta = number_field(holder, "in_scope_push", minimum=0.0, error=ValueError)
    if beta > 0 and gate_layer is None:
        raise ValueError("in_scope_push acts where a prefill gate reads in scope: it needs a gate layer")
    return beta


@dataclass(frozen=True)
class CalibratorConfig:
    """Architecture and training settings of a calibrator; validated on construction.

    Attributes:
        hidden_size: Width ``d`` of the model's residual stream.
        layers: The steered decoder layers. Activations passed to :func:`~crvlm_core.methods.crvlm.train.
            train_calibrator` are ``[n, len(layers), d]`` with ``acts[:, j]`` read at ``layers[j]`` (order kept as
            given; no duplicates; stored as a tuple).
        width: Hidden width ``W`` of the flow network.
        shared: ``False`` (default): one block (flow, gate, α) per steered layer — each layer learns its own update,
            and blocks do not compete for capacity. ``True``: one block for all layers, with a learned per-layer
            embedding (initialised to zero) added to its input — ``1/len(layers)`` of the parameters.
        gate_dim: Width of the gate's input. ``None`` → ``hidden_size`` (the gate reads ``x``). Another value means
            the gate reads an explicit prefill summary (``gate_input``; e.g. a late layer's last-prompt-token state).
        gate_hidden: ``0`` (default, the paper): the gate is linear, ``σ(w·g + b)``; ``H > 0``: a one-hidden-layer
            gate ``σ(Linear(H, 1)(SiLU(Linear(d_gate, H)(LayerNorm(g)))))`` (#25: a scope that holds under framing).
        gate_fit: ``"joint"`` (default, the paper): the gate learns with the flow network from the summed losses.
            ``"probe"`` (#25; a linear prefill gate only): before the flow network trains, the gate is fitted alone as
            an L2-regularised logistic regression on standardised gate inputs (out of scope = 1; the scaling folded into
            its weights), then frozen — here and in the behavioural stage.
        target_scale: ``λ`` in the out-of-scope target ``h_out + λ·s``.
        w_out, w_in, w_ortho, w_vision: Weights of the four loss terms (the vision term is only active on batches
            with vision counterfactuals).
        gate_supervision: Include the gate's binary cross-entropy ``g`` in the in-scope loss.
        lr: Adam learning rate.
        batch_size: In-scope *and* out-of-scope samples per step (each step sees ``batch_size`` of each).
        epochs: Training epochs; an epoch is ``ceil(max(n_in, n_out) / batch_size)`` steps.
        seed: Seeds initialisation, the validation split and batch sampling (same seed → identical weights).
        val_fraction: Fraction of each group (in / out) held out for validation, ``0 ≤ f < 1``; with ``f > 0`` the
            history has ``val_*`` entries (same terms, whole validation set, no gradient).
        patience: Early stopping: stop once the validation total loss has not improved for ``patience`` epochs and
            return the weights of the best validation epoch. Requires ``val_fraction > 0``.
    """

    hidden_size: int
    layers: tuple[int, ...]
    width: int = 1024
    shared: bool = False
    gate_dim: int | None = None
    gate_hidden: int = 0
    gate_fit: str = "joint"
    target_scale: float = 1.0
    w_out: float = 1.0
    w_in: float = 1.0
    w_ortho: float = 1.0
    w_vision: float = 1.0
    gate_supervision: bool = True
    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 200
    seed: int = 42
    val_fraction: float = 0.0
    patience: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "width", "batch_size", "epochs"):
            int_field(self, name)
        if self.gate_dim is not None:
            int_field(self, "gate_dim")
        int_field(self, "seed", minimum=0)
        int_field(self, "gate_hidden", minimum=0)
        if self.gate_fit not in GATE_FITS:
            raise ValueError(f"gate_fit must be one of {GATE_FITS}, got {self.gate_fit!r}")
        if self.gate_fit == "probe" and (self.gate_hidden or self.gate_dim is None):
            raise ValueError("gate_fit='probe' fits a linear prefill gate: it needs gate_dim (a gate layer) and "
                             "gate_hidden=0")
        layers_field(self, "layers", optional=False)
        set_field(self, "shared", bool(self.shared))
        set_field(self, "gate_supervision", bool(self.gate_supervision))
        number_field(self, "target_scale")
        for name in ("w_out", "w_in", "w_ortho", "w_vision"):
            number_field(self, name, minimum=0.0)
        if self.w_out == self.w_in == self.w_ortho == self.w_vision == 0:
            raise ValueError("all loss weights are 0; nothing to train")
        number_field(self, "lr", minimum=0.0, strict=True)
        f = number_field(self, "val_fraction", minimum=0.0)
        if f >= 1:
            raise ValueError(f"val_fraction must be < 1, got {f}")
        if self.patience is not None:
            int_field(self, "patience")
            if f == 0:
                raise ValueError("patience (early stopping) needs a validation set: set val_fraction > 0")

    @property
    def d_gate(self) -> int:
        """Width of the gate's input (``gate_dim``, or ``hidden_size`` when ``None``)."""
        return self.hidden_size if self.gate_dim is None else self.gate_dim

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict (round-trips through ``CalibratorConfig(**d)``)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass(frozen=True)
class BehaviouralConfig:
    """Settings of the behavioural fine-tune (:func:`~crvlm_core.methods.crvlm.behavioural.finetune_behavioural`):
    ``epochs`` passes with Adam at ``lr``, ``batch_size`` prompts of each scope per step, loss
    ``w_ce·CE(refusal_text | out-of-scope prompt) + w_kl·KL(unsteered ‖ calibrated | in-scope prompt)``.
    ``max_per_scope``: at most this many training questions of each scope, a seeded subset (None: all; the stage's
    cost grows with the larger scope)."""

    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 4
    w_ce: float = 1.0
    w_kl: float = 1.0
    refusal_text: str = BEHAVIOURAL_REFUSAL
    seed: int = 42
    max_per_scope: int | None = None

    def __post_init__(self) -> None:
        int_field(self, "epochs", minimum=0)
        if self.max_per_scope is not None:
            int_field(self, "max_per_scope")
        int_field(self, "batch_size")
        int_field(self, "seed", minimum=0)
        number_field(self, "lr", minimum=0.0, strict=True)
        number_field(self, "w_ce", minimum=0.0)
        number_field(self, "w_kl", minimum=0.0)
        if not isinstance(self.refusal_text, str) or not self.refusal_text:
            raise ValueError(f"refusal_text must be a non-empty string, got {self.refusal_text!r}")

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


_CALIBRATOR_FIELDS = ("width", "gate_hidden", "gate_fit", "shared", "target_scale", "w_out", "w_in", "w_ortho",
                      "w_vision", "gate_supervision", "lr", "batch_size", "epochs", "seed", "val_fraction", "patience")


@dataclass(frozen=True)
class CrvlmConfig:
    """Everything a CR-VLM fit on a model is set by (:func:`~crvlm_core.methods.crvlm.steering.fit_crvlm`).

    Attributes:
        layers: Steered layers (``None`` → a third of the way up, :func:`~crvlm_core.methods.refusal_vectors.
            default_layers`); stored as a sorted tuple.
        gate_layer: ``"auto"`` → a late layer (prefill gating, :func:`~crvlm_core.methods.crvlm.calibrated.
            default_gate_layer`); an int → that layer; ``None`` → the paper's gate, reading the steered layer's own
            hidden state.
        gate_pass: How a prefill gate is read (:class:`~crvlm_core.steer.base.PrefillGate`): ``"shared"`` — in the
            one unsteered prompt pass, steering from the prompt's last token on (generation at plain speed);
            ``"separate"`` — in an extra prompt pass, every prompt token steered. The behavioural stage trains
            with the same positions steered.
        extract_batch_size: Prompts per forward when reading activations.
        train_positions: ``"tokens"`` — train on the last prompt token plus ``positions_per_prompt`` random other
            prompt tokens of each sample (the calibrator is applied at every position at generation; with a prefill
            gate, each token's gate input is its prompt's summary); ``"last"`` — only the last prompt token (the
            paper's reading).
        positions_per_prompt: Extra prompt tokens per sample with ``train_positions="tokens"``.
        behavioural: A :class:`BehaviouralConfig` → the behavioural fine-tune runs after the activation losses
            (when its ``epochs`` > 0); ``None`` → none.
        framing_augment: Copies of every training question dressed in misleading framing with the training templates
            (:func:`crvlm_core.data.framing.framing_augment`, seeded; never the test wording), added to the calibrator's
            training data and, unless ``gate_fit="probe"`` (the gate is frozen then), the behavioural stage's (#25).
            0: none (the paper).
        hard_gate: ``False`` (default, the paper): the update is scaled by the gate value, ``α·ρ·Δx``. ``True`` (a
            prefill gate only; #25): each row's ρ is rounded to 0 or 1 at 0.5 — an in-scope prompt whose ρ is low but
            not zero is left exactly alone, an out-of-scope one gets the whole update. Applies wherever the prefill gate
            is read (the behavioural stage, generation); the calibrator's activation losses train the soft gate.
        gate_extra_layers: More layers a prefill gate reads (#25): its input is the last prompt token's state at the
            gate layer and at each of these, concatenated in ascending layer order (width ``d · (1 + n)``). ``()``
            (default): the gate layer alone.
        in_scope_push: ``0`` (default, the paper: in-scope states are left alone). ``β > 0`` (a prefill gate only;
            #25): where the gate reads in scope, the steered layers get ``−β·(1 − ρ)·v`` (the refusal vector,
            reversed), so the model's *own* refusals of in-scope questions are removed too. Applied at generation
            only: neither the activation losses nor the behavioural stage see it, so a fit with and without it trains
            the same calibrator. On Qwen2.5-0.5B (#25, docs/results.md) 0.25–0.5 changed most in-scope answers’
            first 20 tokens and answered 0–1 of 3 held-out questions the model refuses on its own; 1.0 derails answers.
        Remaining fields: :class:`CalibratorConfig`'s (validated by it). Defaults differ from the paper's (200
            epochs, batch 8, lr 1e-4 on one state per prompt) because each prompt contributes
            ``positions_per_prompt + 1`` states: 40 epochs of batch 32 at lr 3e-4 take a similar number of steps.
    """

    layers: tuple[int, ...] | None = None
    gate_layer: int | str | None = "auto"
    gate_pass: str = "shared"
    target_scale: float = 1.0
    width: int = 1024
    gate_hidden: int = 0
    gate_fit: str = "joint"
    epochs: int = 40
    lr: float = 3e-4
    batch_size: int = 32
    seed: int = 42
    w_out: float = 1.0
    w_in: float = 1.0
    w_ortho: float = 1.0
    w_vision: float = 1.0
    gate_supervision: bool = True
    val_fraction: float = 0.0
    patience: int | None = None
    shared: bool = False
    extract_batch_size: int = 8
    train_positions: str = "tokens"
    positions_per_prompt: int = 8
    behavioural: BehaviouralConfig | None = None
    framing_augment: int = 0
    hard_gate: bool = False
    gate_extra_layers: tuple[int, ...] = ()
    in_scope_push: float = 0.0

    def __post_init__(self) -> None:
        if self.layers is not None:
            set_field(self, "layers", tuple(sorted(layers_field(self, "layers"))))
        if self.gate_layer is not None and self.gate_layer != "auto":
            int_field(self, "gate_layer", minimum=0)
        if self.gate_pass not in GATE_PASSES:
            raise ValueError(f"gate_pass must be one of {GATE_PASSES}, got {self.gate_pass!r}")
        if self.train_positions not in ("tokens", "last"):
            raise ValueError(f"train_positions must be 'tokens' or 'last', got {self.train_positions!r}")
        int_field(self, "extract_batch_size")
        int_field(self, "positions_per_prompt", minimum=0)
        int_field(self, "framing_augment", minimum=0)
        if not isinstance(self.hard_gate, bool):
            raise ValueError(f"hard_gate must be a bool, got {self.hard_gate!r}")
        if self.gate_extra_layers:
            set_field(self, "gate_extra_layers", tuple(sorted(layers_field(self, "gate_extra_layers",
                                                                           error=ValueError))))
            if self.gate_layer is None:
                raise ValueError("gate_extra_layers are read with a prefill gate: they need a gate layer ('auto' or a "
                                 "layer)")
        else:
            set_field(self, "gate_extra_layers", ())
        if self.hard_gate and self.gate_layer is None:
            raise ValueError("hard_gate rounds a prefill gate's value: it needs a gate layer ('auto' or a layer)")
        set_field(self, "in_scope_push", check_push(self.in_scope_push, self.gate_layer))
        if isinstance(self.behavioural, dict):
            set_field(self, "behavioural", BehaviouralConfig(**self.behavioural))
        elif self.behavioural is not None and not isinstance(self.behavioural, BehaviouralConfig):
            raise ValueError(f"behavioural must be a BehaviouralConfig or None, got {type(self.behavioural).__name__}")
        if self.gate_fit == "probe" and self.gate_layer is None:
            raise ValueError("gate_fit='probe' needs a prefill gate layer (gate_layer 'auto' or a layer)")
        probe = self.calibrator_config(hidden_size=1, layers=(0,), gate_dim=1 if self.gate_layer is not None else None)
        # CalibratorConfig validates the shared fields
        for name in _CALIBRATOR_FIELDS:
            set_field(self, name, getattr(probe, name))

    def calibrator_config(self, hidden_size: int, layers, gate_dim: int | None = None) -> CalibratorConfig:
        """The :class:`CalibratorConfig` of this fit for a model of width ``hidden_size``."""
        return CalibratorConfig(hidden_size=hidden_size, layers=layers, gate_dim=gate_dim,
                                **{name: getattr(self, name) for name in _CALIBRATOR_FIELDS})

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict (round-trips through ``CrvlmConfig(**d)``)."""
        d = dataclasses.asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        d["gate_extra_layers"] = list(self.gate_extra_layers)
        return d
