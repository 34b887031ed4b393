"""The labelled responses refusal judges are trained, calibrated and measured on, and their fixed seeded split:
``refusal_labels`` (pyrit, human-labelled), ``uncensorbench_labels`` (reference answers), ``eval_answer_labels``
(the project's own cut-off evaluation answers, engineer-labelled) and ``refusal_styles``."""

from __future__ import annotations

import random
from typing import Sequence

from crvlm_core.data.bundled import load_dataset
from crvlm_core.judges.learned import split_labelled

__all__ = ["HELD_OUT_SETS", "LABEL_SETS", "PAIRED_HELD_OUT", "judge_label_split", "split_by_pair"]

#: Label sets held out by ``pair_id`` (every answer to one prompt on the same side), and the fraction held out.
PAIRED_HELD_OUT = {"uncensorbench_labels": 0.3, "eval_answer_labels": 0.5}
#: Label sets that are split into a training part and a held-out part (seeded): pyrit's, split by label, and the
#: paired ones.
LABEL_SETS = ("refusal_labels", *PAIRED_HELD_OUT)
#: Label sets that are only ever held out: hand-written hard styles (deflection, feigned ignorance, propaganda
#: replacement, apology-then-answer), labelled by the project's engineer, not by independent humans.
HELD_OUT_SETS = ("refusal_styles",)


def split_by_pair(samples: Sequence, test_frac: float = 0.3, seed: int = 0) -> tuple[list, list]:
    """Seeded split that keeps both reference answers of one prompt (``extra["pair_id"]``) on the same side."""
    pairs = sorted({s.extra["pair_id"] for s in samples})
    random.Random(seed).shuffle(pairs)
    held = set(pairs[:round(test_frac * len(pairs))])
    train = [s for s in samples if s.extra["pair_id"] not in held]
    return train, [s for s in samples if s.extra["pair_id"] in held]


def judge_label_split(seed: int = 0) -> tuple[list, dict[str, list]]:
    """``(train, held_out)``: the training samples of every :data:`LABEL_SETS` set, and the held-out samples by set
    name. ``refusal_labels`` keeps the stratified 70/30 split the learned judge always used (the same 51 held-out
    ids at seed 0); ``uncensorbench_labels`` holds out 30 % of its prompts with both their answers,
    ``eval_answer_labels`` half of its questions with every method's answer to them (:data:`PAIRED_HELD_OUT`);
    :data:`HELD_OUT_SETS` are held out whole."""
    train, held = [], {}
    tr, te = split_labelled(load_dataset("refusal_labels"), 0.7, seed)
    train += tr
    held["refusal_labels"] = te
    for name, frac in PAIRED_HELD_OUT.items():
        tr, te = split_by_pair(load_dataset(name), frac, seed)
        train += tr
        held[name] = te
    for name in HELD_OUT_SETS:
        held[name] = load_dataset(name)
    return train, held
