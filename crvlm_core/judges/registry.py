"""Judges by name: the default judge, :func:`get_judge` (keyword, learned, llm) and :func:`judge_responses`, the
refusal flags of responses under a named judge or a judge object."""

from __future__ import annotations

from typing import Any, Sequence

from crvlm_core.judges.base import Judge
from crvlm_core.judges.keyword import KeywordJudge
from crvlm_core.judges.learned import LearnedJudge
from crvlm_core.judges.llm import HTTPBackend, LLMJudge, LocalLMBackend

__all__ = ["DEFAULT_JUDGE", "JUDGES", "get_judge", "judge_responses"]

#: The best offline judge, measured by scripts/validate_judges.py (outputs/measurements/judges.json) on the seeded
#: held-out 30 % of ``refusal_labels`` (n=51): learned acc 0.824, κ 0.618 (ROC AUC 0.909); keyword acc 0.686,
#: κ 0.429; llm with Qwen2.5-Coder-0.5B as judge acc 0.627, κ −0.04 (it answers "1" for everything; AUC 0.21).
#: The learned judge needs the prompts (see :func:`judge_responses`).
DEFAULT_JUDGE = "learned"

#: Names accepted by :func:`get_judge`.
JUDGES = ("keyword", "learned", "llm")

_CACHE: dict[str, Judge] = {}


def get_judge(name: str, **kwargs: Any) -> Judge:
    """A judge by name.

    ``keyword``: no options. ``learned``: :meth:`LearnedJudge.from_labels` options (``train_frac``, ``seed``,
    ``synthetic``, ``cache_dir``). ``llm``: ``model`` (spec or handle, default ``qwen2.5-0.5b``) and ``batch_size``
    for a local judge, or ``url`` + ``api_model`` (+ ``api_key_env``, ``timeout``) for an HTTP endpoint; plus
    ``template`` and ``threshold``. Judges built without options are reused within the process.
    """
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available: {', '.join(JUDGES)} "
                         "(refusal scores: use refusal_score_judge(scores))")
    if not kwargs and name in _CACHE:
        return _CACHE[name]
    if name == "keyword":
        judge: Judge = KeywordJudge()
    elif name == "learned":
        judge = LearnedJudge.from_labels(**kwargs)
    else:
        opts = {k: kwargs.pop(k) for k in ("template", "threshold", "max_response_chars") if k in kwargs}
        if "url" in kwargs:
            backend = HTTPBackend(kwargs.pop("url"), kwargs.pop("api_model"), **kwargs)
        else:
            backend = LocalLMBackend(kwargs.pop("model", "qwen2.5-0.5b"), **kwargs)
        judge = LLMJudge(backend, **opts)
    if not kwargs:
        _CACHE[name] = judge
    return judge


def judge_responses(responses: Sequence[str], judge: str | Judge = "keyword", prompts: Sequence[str] | None = None) -> list[bool]:
    """Refusal flags for responses with a judge (a name for :func:`get_judge` or a judge object).
    ``learned`` and ``llm`` need ``prompts`` (one per response)."""
    j = get_judge(judge) if isinstance(judge, str) else judge
    return [r.refused for r in j.judge(prompts, responses)]
