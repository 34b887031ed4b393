"""The data of Refusal Steering: the refusal-topics set and its seeded per-subject train / val / test splits (the
held-out ids do not depend on which other subjects are present)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from crvlm_core.data.schema import Sample
from crvlm_core.data.splits import split

__all__ = ["DATASET", "TopicSplits", "cap_per_subject", "check_topics", "topic_splits"]

DATASET = "refusal-topics"
"""Default data: political + neutral questions on the same countries, and harmful requests."""


@dataclass
class TopicSplits:
    """Per-subject train / val / test samples (disjoint, seeded)."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def of(self, part: str, subject: str) -> list[Sample]:
        return [s for s in getattr(self, part) if s.subject == subject]


def topic_splits(samples: Sequence[Sample], n_val: int = 12, n_test: int = 24, seed: int = 42) -> TopicSplits:
    """Split per subject: ``n_test`` held out (the same ids whatever other subjects are present: the refusal
    organism is trained only on the rest), then ``n_val`` for the strength search, the rest for fitting."""
    rest, test = split(samples, n_test=n_test, seed=seed, stratify_by="subject")
    train, val = split(rest, n_test=n_val, seed=seed + 1, stratify_by="subject") if n_val else (rest, [])
    return TopicSplits(train, val, test)


def cap_per_subject(samples: Sequence[Sample], n: int) -> list[Sample]:
    """At most ``n`` samples of each subject, order kept."""
    counts: dict[str, int] = {}
    out = []
    for s in samples:
        counts[s.subject] = counts.get(s.subject, 0) + 1
        if counts[s.subject] <= n:
            out.append(s)
    return out


def check_topics(samples: Sequence[Sample], *topics: str) -> None:
    """Raise ``ValueError`` naming the available subjects if a topic is not a subject of ``samples``."""
    present = sorted({s.subject for s in samples})
    for t in topics:
        if t not in present:
            raise ValueError(f"unknown topic {t!r}: not a subject of the data; available subjects: {present}")
    if len(set(topics)) != len(topics):
        raise ValueError(f"topics must differ, got {list(topics)}")

