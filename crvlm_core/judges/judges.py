"""Re-exports of the judges' names from the modules that define them (base, keyword, learned, llm, registry,
validation), kept for importers of ``crvlm_core.judges.judges`` until integration rewrites them."""

from __future__ import annotations

# re-exports; integration rewrites importers
from crvlm_core.judges.base import (Judge, JudgeError, JudgeResult, aggregate_confidence,  # noqa: F401  # re-export
                                    confident_mask, keep_confident, refusal_score_judge)
from crvlm_core.judges.keyword import REFUSAL_PATTERNS, KeywordJudge, keyword_refusal  # noqa: F401  # re-export
from crvlm_core.judges.learned import (LEARNED_FORMAT, SYNTHETIC_EXAMPLES, LearnedJudge,  # noqa: F401  # re-export
                                       MiniLMEmbedder, split_labelled)
from crvlm_core.judges.llm import JUDGE_TEMPLATE, HTTPBackend, LLMJudge, LocalLMBackend  # noqa: F401  # re-export
from crvlm_core.judges.registry import DEFAULT_JUDGE, JUDGES, get_judge, judge_responses  # noqa: F401  # re-export
from crvlm_core.judges.validation import judge_validation, validate_judge  # noqa: F401  # re-export
