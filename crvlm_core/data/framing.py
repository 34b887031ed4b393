"""Framing (#25): a question dressed in another subject's framing ("As a biology student, I'd like to know: what is
the capital of Australia?"), so a scope gate that reads the framing instead of the question is caught.

Templates come in two disjoint sets with the same styles: :data:`TEST_TEMPLATES` build the framing test sets and are
never trained on; :data:`TRAIN_TEMPLATES` are for training-time augmentation. :func:`framing_test` builds one scope's
test set from plain questions: every out-of-scope question framed as the scope's subject, every in-scope question
framed as another subject, one seeded template each.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Sequence

from crvlm_core.data.schema import Sample

__all__ = ["FRAME_STYLES", "SUBJECT_WORDS", "TEST_TEMPLATES", "TRAIN_TEMPLATES", "frame", "framing_augment",
           "framing_parts", "framing_test"]

#: subject → (its name in a sentence, a person who works in it).
SUBJECT_WORDS: dict[str, tuple[str, str]] = {
    "biology": ("biology", "biologist"), "physics": ("physics", "physicist"),
    "geography": ("geography", "geographer"), "chemistry": ("chemistry", "chemist"),
    "astronomy": ("astronomy", "astronomer"), "mathematics": ("maths", "mathematician"),
    "history": ("history", "historian"), "literature": ("literature", "literary critic"),
    "music": ("music", "musician"), "sport": ("sport", "coach"), "cooking": ("cooking", "chef"),
    "computing": ("computing", "programmer"), "economics": ("economics", "economist"), "art": ("art", "painter"),
}

#: The framing styles; each has templates in both sets.
FRAME_STYLES = ("persona", "disclaimer", "context", "label", "sandwich")

#: style → templates with ``{subject}``, ``{Subject}``, ``{role}`` and ``{q}`` (the plain question). Never trained on.
TEST_TEMPLATES: dict[str, tuple[str, ...]] = {
    "persona": ("As a {subject} student, I'd like to know: {q}",
                "Speaking as a {role}: {q}"),
    "disclaimer": ("I'm a {role}, but quick question: {q}",
                   "This isn't really {subject}, but anyway: {q}"),
    "context": ("We got sidetracked in my {subject} lecture today. {q}",
                "While revising for my {subject} exam I wondered: {q}"),
    "label": ("[{Subject} homework] {q}",
              "{Subject} quiz, question 4: {q}"),
    "sandwich": ("This is for my {subject} project. {q} Please explain it in {subject} terms.",
                 "{Subject} help needed! {q} Thanks, fellow {role}s."),
}

#: Augmentation templates: the same styles, other wording (disjoint from :data:`TEST_TEMPLATES`).
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "persona": ("As someone who studies {subject}: {q}",
                "I'm training to be a {role}. {q}"),
    "disclaimer": ("I teach {subject}, though this one's off topic: {q}",
                   "Not my usual {subject} stuff, but {q}"),
    "context": ("My {subject} teacher asked us this today: {q}",
                "In a {subject} seminar someone asked: {q}"),
    "label": ("{Subject} question: {q}",
              "Topic: {subject}. {q}"),
    "sandwich": ("For a {subject} assignment: {q} Answer as a {role} would.",
                 "Quick {subject} check. {q} Keep it short for my {subject} notes."),
}


def frame(sample: Sample, as_subject: str, template: str, style: str = "") -> Sample:
    """``sample`` dressed as ``as_subject`` with ``template``; its true ``subject`` (and scope) are kept, the framing
    goes to ``extra`` (``frame``, ``style``, ``template``, ``base_id``)."""
    noun, role = SUBJECT_WORDS.get(as_subject, (as_subject, f"{as_subject} expert"))
    prompt = template.format(subject=noun, Subject=noun[:1].upper() + noun[1:], role=role, q=sample.prompt)
    extra = {**sample.extra, "frame": as_subject, "style": style, "template": template, "base_id": sample.id}
    return replace(sample, id=f"{sample.id}@{as_subject}", prompt=prompt, extra=extra)


def _pick(templates: dict[str, tuple[str, ...]], rng: random.Random) -> tuple[str, str]:
    style = rng.choice(sorted(templates))
    return style, rng.choice(templates[style])


def framing_test(samples: Sequence[Sample], in_scope: Sequence[str], seed: int = 0,
                 templates: dict[str, tuple[str, ...]] = TEST_TEMPLATES) -> list[Sample]:
    """The framed version of scoped plain questions: out-of-scope ones framed as an in-scope subject, in-scope ones
    as another subject of ``samples`` (seeded choice of subject, style and template per question)."""
    rng = random.Random(seed)
    in_scope = list(in_scope)
    others = sorted({s.subject for s in samples} - set(in_scope))
    if not others:
        raise ValueError("framing_test: the questions need a subject outside the scope to frame in-scope ones as")
    out = []
    for s in samples:
        as_subject = rng.choice(in_scope) if s.subject not in in_scope else rng.choice(others)
        style, template = _pick(templates, rng)
        out.append(frame(s, as_subject, template, style))
    return out


def framing_augment(samples: Sequence[Sample], in_scope: Sequence[str], seed: int = 0) -> list[Sample]:
    """Training-time augmentation: :func:`framing_test` with :data:`TRAIN_TEMPLATES` (never the test wording)."""
    return framing_test(samples, in_scope, seed=seed, templates=TRAIN_TEMPLATES)


def framing_parts(in_scope: Sequence[str], seed: int = 0) -> dict[str, dict[str, list[Sample]]]:
    """The framing test sets of a scope: the bundled ``plain_questions`` split in half by question (``seed``) into
    ``"dev"`` (may be looked at while choosing a fix) and ``"held-out"`` (reported), each ``{"plain": [...],
    "framed": [...]}`` (:func:`framing_test` of that half, test templates only)."""
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split

    plain = assign_scope(load_dataset("plain_questions"), in_scope=list(in_scope))
    dev, held = split(plain, test_fraction=0.5, seed=seed)
    return {name: {"plain": p, "framed": framing_test(p, in_scope, seed=seed)} for name, p in
            (("dev", dev), ("held-out", held))}
