"""The ``system-prompt`` baseline: no training, a system prompt that names the in-scope subjects and asks the model
to refuse everything else with the canonical refusal (also what the LoRA baseline learns to say out of scope)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["REFUSAL_TEXT", "scope_system_prompt"]

#: What the LoRA adapter learns to say out of scope (the default model's own refusal; also the behavioural target).
REFUSAL_TEXT = "I'm sorry, but I can't assist with that."


def scope_system_prompt(in_scope: Sequence[str], refusal: str = REFUSAL_TEXT) -> str:
    """The system prompt of the ``system-prompt`` baseline, stating the constraint for the in-scope subjects."""
    subjects = [s.strip() for s in in_scope if s and s.strip()]
    if not subjects:
        raise ValueError("scope_system_prompt: no in-scope subjects given")
    names = subjects[0] if len(subjects) == 1 else ", ".join(subjects[:-1]) + " and " + subjects[-1]
    return (f"You are an assistant that only answers questions about {names}. If a question is about anything "
            f"else, do not answer it; reply only: \"{refusal}\"")
