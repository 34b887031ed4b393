"""Capability retention (issue #21): multiple-choice accuracy on MMLU's bundled choices, steered and unsteered — the
letter A–D with the most next-token probability after the question, its four options and the assistant's "The answer
is" — on held-out in-scope questions and on a fixed general set across subjects, with bootstrap intervals;
predictions cached in the one cache.

Text only: the questions carry no image, so a vision-language model is scored on text (a family that cannot run
without an image stops with one line)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.cache import cached_json
from crvlm_core.core.errors import InputError
from crvlm_core.core.io import nan_to_none
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import Sample
from crvlm_core.data.splits import split
from crvlm_core.extract import prompt_batches
from crvlm_core.judges.llm import LocalLMBackend
from crvlm_core.metrics import bootstrap_ci, paired_difference_ci
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.interventions import intervention_fingerprint
from crvlm_core.steer.score import steered_logits

__all__ = ["ANSWER_PREFIX", "DATASETS", "DEFAULT_N", "INSTRUCTION", "LETTERS", "QuestionSets", "capability",
           "capability_questions", "choice_predictions", "general_questions", "in_scope_questions", "letter_ids",
           "mc_prompt"]

#: Datasets with four bundled choices and an answer letter per question (``crvlm eval --capability``'s choices).
DATASETS = ("mmlu",)
LETTERS = ("A", "B", "C", "D")
#: The line after the options; the prompt goes through the model's chat template like every other prompt.
INSTRUCTION = "Answer with the letter."
#: What the assistant's turn starts with (teacher-forced), so that the next token is the letter. Without it the
#: default Qwen2.5-0.5B often starts "To …" and its letter choice is at chance (0.21 on 80 questions; 0.36 with it).
ANSWER_PREFIX = "The answer is"
#: Questions per set (held-out in-scope; general) unless told otherwise.
DEFAULT_N = 100
#: Salt of the general set's order: per subject, questions by SHA-256 of ``"<salt>:<id>"``, subjects taken in turn.
GENERAL_SALT = "crvlm-capability-general"


def mc_prompt(sample: Sample) -> str:
    """The question, its four options as ``A. …`` lines, then :data:`INSTRUCTION`."""
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, sample.extra["choices"]))
    return f"{sample.prompt}\n{options}\n{INSTRUCTION}"


def _questions(dataset: str) -> list[Sample]:
    """Every question of ``dataset``, each checked to carry four string choices and an answer letter."""
    if dataset not in DATASETS:
        raise InputError(f"--capability {dataset!r}: no multiple-choice data of that name; choose from {DATASETS}")
    samples = load_dataset(dataset)
    for s in samples:
        choices, answer = s.extra.get("choices"), s.extra.get("answer")
        if not (isinstance(choices, list) and len(choices) == 4 and all(isinstance(c, str) for c in choices)
                and answer in LETTERS):
            raise InputError(f"{dataset}: question {s.id!r} lacks four string `choices` and an `answer` A–D")
    return samples


def in_scope_questions(in_scope: Sequence[str], n: int = DEFAULT_N, seed: int = 42,
                       dataset: str = "mmlu") -> list[Sample]:
    """Held-out in-scope questions: the in-scope stratum's test half of the seeded 50/50 split ``crvlm fit`` and
    ``crvlm eval`` use (``split(..., test_fraction=0.5, seed)``, whose train half every fit on the dataset with that
    seed draws from), first ``n``. In-scope subjects the dataset lacks are left out; none at all is an error."""
    samples = _questions(dataset)
    present = sorted({s.subject for s in samples})
    subjects = [s for s in in_scope if s in present]
    if not subjects:
        raise InputError(f"--capability {dataset}: none of the in-scope subjects ({', '.join(in_scope)}) is a "
                         f"subject of {dataset} ({', '.join(present)})")
    ins = [dataclasses.replace(s, scope="in") for s in samples if s.subject in subjects]
    _, test = split(ins, test_fraction=0.5, seed=seed)
    return test[:n]


def general_questions(n: int = DEFAULT_N, dataset: str = "mmlu") -> list[Sample]:
    """The fixed general set: per subject, the questions ordered by SHA-256 of ``"<GENERAL_SALT>:<id>"``, subjects
    (sorted) taken in turn, first ``n`` — the same ids on every run and for every scope or seed, and a smaller ``n``
    gives a prefix of a larger one."""
    by_subject: dict[str, list[Sample]] = defaultdict(list)
    digest = lambda s: hashlib.sha256(f"{GENERAL_SALT}:{s.id}".encode()).hexdigest()
    for s in sorted(_questions(dataset), key=digest):
        by_subject[s.subject].append(s)
    rounds = max(map(len, by_subject.values()))
    order = [by_subject[subj][i] for i in range(rounds) for subj in sorted(by_subject) if i < len(by_subject[subj])]
    return order[:n]


def capability_questions(in_scope: Sequence[str], n: int = DEFAULT_N, seed: int = 42,
                         dataset: str = "mmlu") -> tuple[list[Sample], list[Sample]]:
    """``(held-out in-scope questions, general questions)``; checks the data and scope (no model needed)."""
    return in_scope_questions(in_scope, n, seed, dataset), general_questions(n, dataset)


def letter_ids(handle: ModelHandle) -> dict[str, list[int]]:
    """Vocabulary ids of each answer letter: those :meth:`~crvlm_core.judges.llm.LocalLMBackend.answer_ids` finds
    ("A", " A", any token decoding to it), upper case only (its lower-case "a" is also the article)."""
    found = LocalLMBackend(handle).answer_ids(LETTERS)
    tok = handle.tokenizer
    ids = {letter: [i for i in found[letter] if tok.decode([i]).strip() == letter] for letter in LETTERS}
    if not all(ids.values()):
        raise InputError(f"{handle.spec}: the tokenizer has no token for one of the letters {LETTERS}")
    return ids


@torch.no_grad()
def _predict(handle: ModelHandle, questions: list[Sample], interventions: Sequence[Intervention],
             system: str | None, batch_size: int) -> list[dict]:
    ids = letter_ids(handle)
    prompts = [mc_prompt(q) for q in questions]
    rows: list[dict] = [{}] * len(questions)
    for _, idx in prompt_batches(handle, prompts, [False] * len(prompts), batch_size):
        enc = handle.build_inputs([prompts[k] for k in idx], None, system, assistant_prefix=ANSWER_PREFIX)
        logp = torch.log_softmax(steered_logits(handle, enc, interventions, last_only=True)[:, -1].double(), -1)
        mass = torch.stack([logp[:, ids[letter]].logsumexp(-1) for letter in LETTERS], -1)  # [batch, 4] log p
        for j, k in enumerate(idx):
            pick = LETTERS[int(mass[j].argmax())]
            rows[k] = {"id": questions[k].id, "predicted": pick, "correct": pick == questions[k].extra["answer"],
                       "letter_mass": float(mass[j].exp().sum())}
    return rows


def choice_predictions(handle: ModelHandle, questions: Sequence[Sample], interventions: Sequence[Intervention] = (),
                       system: str | None = None, batch_size: int = 8,
                       cache_dir: str | Path | bool | None = None) -> list[dict]:
    """Per question ``{id, predicted, correct, letter_mass}``: the letter with the most next-token probability (its
    token ids summed, :func:`letter_ids`) after :func:`mc_prompt` through the chat template (with ``system``) and the
    assistant's :data:`ANSWER_PREFIX`, one
    steered forward per length-grouped batch (:func:`~crvlm_core.steer.score.steered_logits`: calibrators, gates and
    the shared prompt pass included); ``letter_mass`` is the probability on the four letters together (low when the
    model would rather say something else). Cached as the entry ``capability`` keyed by the model, the questions, the
    interventions' fingerprint, the system prompt and the batch size."""
    questions = list(questions)
    key = {"model": handle.key, "interventions": intervention_fingerprint(list(interventions)), "system": system,
           "batch_size": batch_size, "prompt": [INSTRUCTION, ANSWER_PREFIX], "letters": "upper",
           "questions": [[q.id, q.prompt, q.extra["choices"], q.extra["answer"]] for q in questions]}
    return cached_json(cache_dir, "capability", key,
                       lambda: _predict(handle, questions, interventions, system, batch_size))


def _accuracy(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _summary(steered: list[dict], unsteered: list[dict], seed: int) -> dict:
    """Accuracy steered / unsteered with seeded bootstrap intervals, their paired difference and letter mass."""
    s, u = [r["correct"] for r in steered], [r["correct"] for r in unsteered]
    ci = lambda pair: [nan_to_none(v) for v in pair]
    a_s, a_u = _accuracy(s), _accuracy(u)
    mass = lambda rows: sum(r["letter_mass"] for r in rows) / len(rows) if rows else None
    return {"n": len(s), "accuracy_steered": a_s, "accuracy_unsteered": a_u,
            "accuracy_steered_ci": ci(bootstrap_ci(s, seed=seed)),
            "accuracy_unsteered_ci": ci(bootstrap_ci(u, seed=seed + 1)),
            "difference": None if a_s is None else a_s - a_u,
            "difference_ci": ci(paired_difference_ci(s, u, seed=seed + 2)),
            "letter_mass_steered": mass(steered), "letter_mass_unsteered": mass(unsteered)}


def _scope(subject: str, in_scope: Sequence[str], out_scope: Sequence[str] | None) -> str | None:
    if subject in in_scope:
        return "in"
    return "out" if out_scope is None or subject in out_scope else None


@dataclasses.dataclass(frozen=True)
class QuestionSets:
    """Which questions :func:`capability` scores: ``n`` per set, the eval's split ``seed`` (it picks the held-out
    in-scope questions) and the ``dataset`` (one of :data:`DATASETS`)."""

    n: int = DEFAULT_N
    seed: int = 42
    dataset: str = "mmlu"


def capability(handle: ModelHandle, in_scope: Sequence[str], out_scope: Sequence[str] | None = None, *,
               interventions: Sequence[Intervention] = (), system: str | None = None,
               unsteered: ModelHandle | None = None, sets: QuestionSets = QuestionSets(), batch_size: int = 8,
               cache_dir: str | Path | bool | None = None) -> dict:
    """Multiple-choice accuracy steered (``handle`` with ``interventions`` and ``system``) and unsteered (``unsteered``
    — e.g. the base model of a merged adapter — else ``handle``, with neither), on two sets of ``sets.n`` questions:

    - top level: held-out in-scope questions (:func:`in_scope_questions`; the issue's contract: ``dataset, n,
      accuracy_steered, accuracy_unsteered``);
    - ``general``: the fixed set across subjects (:func:`general_questions`), with ``by_scope`` (``in`` / ``out``:
      subjects outside both scopes of an explicit ``out_scope`` count in neither). Out-of-scope questions are
      expected to lose accuracy under a method that refuses them.

    Each set carries ``accuracy_*_ci`` (95 % percentile bootstrap), ``difference`` (steered − unsteered) with its
    paired ``difference_ci``, the mean ``letter_mass_*`` and the question ``ids``.
    """
    n, seed, dataset = sets.n, sets.seed, sets.dataset
    held_out, general = capability_questions(in_scope, n, seed, dataset)
    union = list({q.id: q for q in held_out + general}.values())
    steered = choice_predictions(handle, union, interventions, system, batch_size, cache_dir)
    plain = steered if ((unsteered is None or unsteered is handle) and not interventions and not system) else \
        choice_predictions(unsteered or handle, union, (), None, batch_size, cache_dir)
    table_s, table_u = {r["id"]: r for r in steered}, {r["id"]: r for r in plain}

    def summary(questions: list[Sample], seed: int) -> dict:
        return _summary([table_s[q.id] for q in questions], [table_u[q.id] for q in questions], seed)

    result = {"dataset": dataset, **summary(held_out, 0), "subjects": sorted({q.subject for q in held_out}),
              "seed": seed, "ids": [q.id for q in held_out]}
    result["general"] = {**summary(general, 10), "ids": [q.id for q in general], "by_scope": {
        scope: summary([q for q in general if _scope(q.subject, in_scope, out_scope) == scope], 20 + 3 * i)
        for i, scope in enumerate(("in", "out"))}}
    result["protocol"] = (f"question, options A-D, '{INSTRUCTION}' through the chat template (text only), the "
                          f"assistant's turn starting '{ANSWER_PREFIX}'; the letter with the most next-token "
                          "probability")
    return result
