"""The cascade judge: a fast judge (learned) decides the pairs it is confident about, a slow one (the llm judge)
the rest; the slow judge is built only when some pair needs it."""

from __future__ import annotations

from typing import Callable, Sequence

from crvlm_core.judges.base import Judge, JudgeResult, check_pairs

__all__ = ["CascadeJudge"]


class CascadeJudge:
    """``fast`` decides where ``|confidence| ≥ tau``; the other pairs go to ``slow()`` (a judge, or a function that
    builds one on first need). ``info["deferred"]`` counts the pairs the slow judge decided in the last call.

    Args:
        fast: a graded judge (its confidences are read; an ungraded verdict is always deferred).
        slow: the judge of the uncertain pairs, or a zero-argument function returning it.
        tau: the confidence the fast judge needs to decide alone.
    """

    name = "cascade"

    def __init__(self, fast: Judge, slow: Judge | Callable[[], Judge], tau: float):
        if not 0 <= tau <= 1:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        self.fast, self._slow, self.tau = fast, slow, float(tau)
        self.info: dict = {"tau": self.tau, "deferred": 0}

    @property
    def slow(self) -> Judge:
        if not hasattr(self._slow, "judge"):
            self._slow = self._slow()
        return self._slow

    def judge(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> list[JudgeResult]:
        prompts, responses = check_pairs(prompts, responses, True, self.name)
        results = list(self.fast.judge(prompts, responses))
        todo = [i for i, r in enumerate(results) if r.confidence is None or abs(r.confidence) < self.tau]
        if todo:
            slow = self.slow.judge([prompts[i] for i in todo], [responses[i] for i in todo])
            for i, r in zip(todo, slow):
                results[i] = r
        self.info["deferred"] = len(todo)
        return results
