"""Fit refusal vectors from scoped data: which prompts to read, with which teacher-forcing prefixes, and which
estimator (:class:`VectorConfig` says which); the CLI, the methods and the notebooks call :func:`fit_vector`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.fields import int_field, layers_field, number_field
from crvlm_core.data.schema import Sample
from crvlm_core.extract import Activations, extract
from crvlm_core.models.handle import ModelHandle
from crvlm_core.vectors.estimators import mean_diff, pca_direction, prompt_based, teacher_forced_mean_diff
from crvlm_core.vectors.ridge import ridge_direction
from crvlm_core.vectors.steering_vector import SteeringVector


__all__ = [
    "METHODS",
    "REFUSAL_PREFIX",
    "COMPLIANT_PREFIX",
    "LITERAL_PREFIX",
    "REFUSAL_SYSTEM_PROMPT",
    "VectorConfig",
    "default_layers",
    "fit_vector",
]

#: Teacher-forcing prefixes (measured on Qwen2.5-0.5B, see README): the one-token pair "Sorry" / "Sure", read at
#: the first assistant token, is the same-token contrast that flips the model into refusing; the longer pair
#: "Sorry, I cannot answer" / "Sure, I can answer" (aligned, same last token) mostly encodes "cannot" vs "can" and
#: barely refuses at the same strength. The long pair is what the prefix-mean variant averages over.
REFUSAL_PREFIX = "Sorry"
COMPLIANT_PREFIX = "Sure"
LONG_REFUSAL_PREFIX = "Sorry, I cannot answer"
LONG_COMPLIANT_PREFIX = "Sure, I can answer"
#: The literal CR-VLM form (eq. 1–2): the refusal prefix's last token against the prompt's last token.
LITERAL_PREFIX = REFUSAL_PREFIX
#: System prompt of the prompt-based ("persona") vector.
REFUSAL_SYSTEM_PROMPT = ("You refuse every request. Never answer the question; always reply only: "
                         "'Sorry, I cannot answer that.'")

#: method → one-line description. ``teacher-forced`` is the default (chosen by measured refusal rate: see README).
METHODS: dict[str, str] = {
    "teacher-forced": "same-token contrast: h(x ⊕ 'Sorry') − h(x ⊕ 'Sure') at the prefix token, out-of-scope x",
    "teacher-forced-literal": "CR-VLM eq. 1–2 literally: h(x ⊕ 'Sorry') at its last token − h(x) at the prompt's last token",
    "teacher-forced-prefix-mean": "'Sorry, I cannot answer' minus 'Sure, I can answer', each averaged over its prefix positions",
    "prompt-based": "persona: h(refusal system prompt ⊕ x) − h(x) at the prompt's last token",
    "ridge": "ridge regression of refusal labels (refusal vs compliant teacher-forced prefix) on activations",
    "mean-diff": "h(out-of-scope x) − h(in-scope x) at the prompt's last token (refusal_direction style)",
    "pca": "first principal component of paired (refusal − compliant) teacher-forced differences",
}


def default_layers(handle: ModelHandle) -> list[int]:
    """One layer a third of the way up the stack (layer 8 of Qwen2.5-0.5B's 24, 10 of SmolLM2's 30)."""
    return [handle.n_layers // 3]


@dataclass(frozen=True)
class VectorConfig:
    """How a refusal vector is fitted; validated on construction.

    Attributes:
        method: One of :data:`METHODS` (default ``"teacher-forced"``).
        layers: Layers the vector is applied at (``None`` → :func:`default_layers`; stored as a tuple).
        alpha: The vector's default strength.
        ridge_lambda: Ridge penalty of ``method="ridge"`` (finite, ≥ 0).
        refusal_prefix, compliant_prefix: Teacher-forcing prefixes (defaults: "Sorry" / "Sure"; for
            ``teacher-forced-prefix-mean`` the long pair). The two should tokenize to the same length.
        batch_size: Prompts per forward when reading activations.
    """

    method: str = "teacher-forced"
    layers: tuple[int, ...] | None = None
    alpha: float = 1.0
    ridge_lambda: float = 1.0
    refusal_prefix: str | None = None
    compliant_prefix: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        layers_field(self, "layers", unique=False)
        number_field(self, "alpha")
        number_field(self, "ridge_lambda", 0.0)
        int_field(self, "batch_size")


def _out_in(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    out = [s for s in samples if s.scope == "out"]
    inn = [s for s in samples if s.scope == "in"]
    if not out:
        raise ValueError("no out-of-scope training samples (empty split): check --in-scope and the data's subjects")
    return out, inn


def fit_vector(handle: ModelHandle, train: Sequence[Sample], config: VectorConfig | str = VectorConfig(), *,
               cache_dir: str | Path | bool | None = True, progress: bool = True) -> SteeringVector:
    """Fit a refusal vector on scoped training samples (``scope`` set on each).

    Args:
        handle: The model.
        train: Scoped samples (out-of-scope ones needed; in-scope ones too for ``mean-diff``).
        config: A :class:`VectorConfig`, or a method name (its defaults otherwise).
        cache_dir: The activation cache (:func:`~crvlm_core.extract.extract`'s; default on).
        progress: Show progress bars.

    Returns:
        A :class:`~crvlm_core.vectors.steering_vector.SteeringVector` with directions for every layer, applied at
        ``config.layers``.
    """
    config = VectorConfig(method=config) if isinstance(config, str) else config
    method = config.method
    layers = [handle.check_layer(int(l)) for l in (config.layers if config.layers is not None
                                                     else default_layers(handle))]
    out, inn = _out_in(train)
    kw = dict(batch_size=config.batch_size, cache_dir=cache_dir)

    def ex(samples, desc: str = "", **more) -> Activations:
        return extract(handle, samples, **kw, **more, progress=progress and (desc or True))

    positions = "last"
    long = method == "teacher-forced-prefix-mean"
    refusal_prefix = config.refusal_prefix or (LONG_REFUSAL_PREFIX if long else REFUSAL_PREFIX)
    compliant_prefix = config.compliant_prefix or (LONG_COMPLIANT_PREFIX if long else COMPLIANT_PREFIX)
    if method in ("teacher-forced", "ridge", "pca", "teacher-forced-prefix-mean"):
        pos = "prefix-mean" if long else "last"
        positions = "prefix-mean" if long else "prefix-last"
        ref = ex(out, position=pos, assistant_prefix=refusal_prefix, desc="refusal prefix")
        com = ex(out, position=pos, assistant_prefix=compliant_prefix, desc="compliant prefix")
        fingerprints = [ref.fingerprint, com.fingerprint]
        if method == "ridge":
            acts = torch.cat([ref.acts, com.acts])
            y = torch.cat([torch.ones(len(out)), torch.zeros(len(out))])
            directions = ridge_direction(acts, y, config.ridge_lambda)
        elif method == "pca":
            directions = pca_direction(ref.acts, com.acts)
        else:
            directions = teacher_forced_mean_diff(ref.acts, com.acts)
    elif method == "teacher-forced-literal":
        positions = "prefix-last vs prompt-last"
        ref = ex(out, assistant_prefix=refusal_prefix, desc="refusal prefix")
        plain = ex(out, desc="prompt")
        fingerprints = [ref.fingerprint, plain.fingerprint]
        directions = teacher_forced_mean_diff(ref.acts, plain.acts)
    elif method == "prompt-based":
        sys_acts = ex(out, system=REFUSAL_SYSTEM_PROMPT, desc="with system prompt")
        plain = ex(out, desc="without system prompt")
        fingerprints = [sys_acts.fingerprint, plain.fingerprint]
        directions = prompt_based(sys_acts.acts, plain.acts)
    else:  # mean-diff
        if not inn:
            raise ValueError("mean-diff needs in-scope training samples too (empty in-scope split)")
        a_out, a_in = ex(out, desc="out-of-scope"), ex(inn, desc="in-scope")
        fingerprints = [a_out.fingerprint, a_in.fingerprint]
        directions = mean_diff(a_out.acts, a_in.acts)
    return SteeringVector(
        directions=directions, method=method, layers=layers, operation="add", alpha=config.alpha, positions=positions,
        model_spec=handle.spec, fingerprint="+".join(fingerprints),
        extra={"n_out": len(out), "n_in": len(inn), "ridge_lambda": config.ridge_lambda if method == "ridge" else None,
               "refusal_prefix": refusal_prefix, "compliant_prefix": compliant_prefix},
    )
