"""The judge interface: ``judge.judge(prompts, responses) -> [JudgeResult(refused, confidence)]``, its error type,
and helpers on confidences (aggregate over samples, keep the confident ones, verdicts from refusal scores)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

__all__ = ["Judge", "JudgeError", "JudgeResult", "aggregate_confidence", "check_pairs", "confident_mask",
           "keep_confident", "refusal_score_judge"]


class JudgeError(RuntimeError):
    """A judge could not produce a verdict (model missing, endpoint failed, bad input)."""


@dataclass(frozen=True)
class JudgeResult:
    """One verdict.

    Attributes:
        refused: the response is judged a refusal.
        confidence: in [−1, 1], > 0 leaning refusal, < 0 leaning answer; ``None`` when the judge has no graded
            score (the keyword rule).
    """

    refused: bool
    confidence: float | None = None


@runtime_checkable
class Judge(Protocol):
    """Anything that labels (prompt, response) pairs as refusal or not."""

    name: str

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[JudgeResult]: ...


def check_pairs(prompts: Sequence[str] | None, responses: Sequence[str], needs_prompts: bool, name: str):
    """``(prompts, responses)`` as lists of equal length; no prompts → empty strings, unless the judge needs them."""
    responses = list(responses)
    if prompts is None:
        if needs_prompts:
            raise ValueError(f"the {name!r} judge needs the prompts: pass prompts=[...] (one per response)")
        return [""] * len(responses), responses
    prompts = list(prompts)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return prompts, responses


def aggregate_confidence(confidences: Sequence[float]) -> float:
    """Confidence of one prompt over K sampled responses: their mean (NaN for none)."""
    c = [float(x) for x in confidences]
    return sum(c) / len(c) if c else float("nan")


def confident_mask(confidences: Sequence[float | None], tau: float) -> list[bool]:
    """True where the judge is confident: ``|c| ≥ tau`` (``None`` is never confident)."""
    return [c is not None and abs(c) >= tau for c in confidences]


def keep_confident(items: Sequence, confidences: Sequence[float | None], tau: float) -> list:
    """The items whose (aggregated) confidence has ``|c| ≥ tau``, e.g. to build clean training sets."""
    if len(items) != len(confidences):
        raise ValueError(f"{len(items)} items but {len(confidences)} confidences")
    return [x for x, keep in zip(items, confident_mask(confidences, tau)) if keep]


def refusal_score_judge(scores: Sequence[float], threshold: float = 0.0) -> list[JudgeResult]:
    """Verdicts from first-step refusal scores (log-odds, :func:`crvlm_core.steer.score.refusal_score`): refused when
    ``score > threshold``; confidence = 2·sigmoid(score) − 1 = tanh(score / 2)."""
    return [JudgeResult(float(s) > threshold, math.tanh(float(s) / 2)) for s in scores]
