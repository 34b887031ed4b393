"""Scopes and splits: tag samples in or out of scope by subject, seeded stratified train/test splits, and the
first ``n`` of each scope."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections import defaultdict
from pathlib import Path
from typing import Iterable

from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import SCOPES, DataError, Sample

__all__ = ["assign_scope", "scope_dataset", "split", "take_per_scope"]


def assign_scope(
    samples: Iterable[Sample],
    in_scope: Iterable[str],
    out_scope: Iterable[str] | None = None,
) -> list[Sample]:
    """Tag samples as in-scope or out-of-scope by subject.

    Subjects in ``in_scope`` become ``"in"``. Without ``out_scope`` every other subject becomes
    ``"out"``; with it, only its subjects become ``"out"`` and the rest are dropped. Samples that
    already carry a scope keep it (and are never dropped).

    Args:
        samples: The samples (not modified).
        in_scope: Subjects the model should answer.
        out_scope: Subjects to refuse; ``None`` means "everything else".

    Returns:
        New samples with ``scope`` set, in input order.

    Raises:
        DataError: A subject name not present in the samples, a subject in both sets, or an
            empty in-scope or out-of-scope result ("empty split").
    """
    samples = list(samples)
    present = sorted({s.subject for s in samples})
    ins = set(in_scope)
    outs = None if out_scope is None else set(out_scope)
    unknown = sorted((ins | (outs or set())) - set(present))
    if unknown:
        raise DataError(f"assign_scope: unknown subject(s) {unknown}; available: {present}")
    if outs is not None and ins & outs:
        raise DataError(f"assign_scope: subject(s) {sorted(ins & outs)} are both in and out of scope")
    result = []
    for s in samples:
        if s.scope is not None:
            result.append(s)
        elif s.subject in ins:
            result.append(dataclasses.replace(s, scope="in"))
        elif outs is None or s.subject in outs:
            result.append(dataclasses.replace(s, scope="out"))
    for scope in SCOPES:
        if not any(s.scope == scope for s in result):
            raise DataError(
                f"assign_scope: empty split: no {scope}-scope samples "
                f"(in_scope={sorted(ins)}, out_scope={None if outs is None else sorted(outs)})"
            )
    return result


def scope_dataset(
    in_scope: Iterable[str] = ("biology",),
    dataset: str | Path = "mmlu",
    out_scope: Iterable[str] | None = None,
    limit_per_subject: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Load a dataset and tag it in/out of scope in one call.

    Equivalent to ``assign_scope(load_dataset(dataset, subjects, limit_per_subject, seed), in_scope,
    out_scope)`` where ``subjects`` is ``in_scope + out_scope`` when ``out_scope`` is given.

    Args:
        in_scope: Subjects the model should answer.
        dataset: A bundled dataset name or a JSONL path.
        out_scope: Subjects to refuse; ``None`` means every other subject of the dataset.
        limit_per_subject: Optional seeded cap per subject.
        seed: Seed for the cap.

    Returns:
        Scoped samples.

    Raises:
        DataError: As :func:`load_dataset` and :func:`assign_scope`.
    """
    ins = list(in_scope)
    outs = None if out_scope is None else list(out_scope)
    subjects = None if outs is None else ins + [s for s in outs if s not in ins]
    samples = load_dataset(dataset, subjects=subjects, limit_per_subject=limit_per_subject, seed=seed)
    return assign_scope(samples, ins, outs)


def _stratum(sample: Sample, key: str) -> str:
    if key in ("scope", "subject", "id"):
        value = getattr(sample, key)
    else:
        value = sample.extra.get(key)
    if value is None:
        hint = " (call assign_scope first)" if key == "scope" else ""
        raise DataError(f"split: sample {sample.id!r} has no {key!r} to stratify by{hint}")
    return str(value)


def _rng(seed: int, stratum: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{stratum}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def split(
    samples: Iterable[Sample],
    n_train: int | None = None,
    n_test: int | None = None,
    test_fraction: float = 0.5,
    seed: int = 42,
    stratify_by: str = "scope",
) -> tuple[list[Sample], list[Sample]]:
    """Seeded, stratified train/test split.

    Each stratum (by default each scope) is shuffled with a generator derived from ``seed`` and the
    stratum's name, so the result does not depend on Python's hash seed or on other strata.
    ``n_train`` / ``n_test`` are counts PER STRATUM (e.g. 200 in + 200 out); when only one is
    given the other takes the rest of the stratum; when neither is, ``test_fraction`` of each
    stratum (rounded, at least 1) goes to test.

    Args:
        samples: The samples.
        n_train: Training samples per stratum.
        n_test: Test samples per stratum.
        test_fraction: Fraction of each stratum used for test when no counts are given.
        seed: Seed of the shuffle.
        stratify_by: ``"scope"``, ``"subject"`` or a key of :attr:`Sample.extra`.

    Returns:
        ``(train, test)``, each ordered by stratum name and then shuffled order.

    Raises:
        DataError: No samples, a sample without the stratify key, bad counts, or a stratum too
            small for the requested counts.
    """
    samples = list(samples)
    if not samples:
        raise DataError("split: no samples")
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"split: test_fraction must be in (0, 1), got {test_fraction}")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and n < 0:
            raise DataError(f"split: {name} must be >= 0, got {n}")
    strata: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        strata[_stratum(s, stratify_by)].append(s)
    train: list[Sample] = []
    test: list[Sample] = []
    for name in sorted(strata):
        group = sorted(strata[name], key=lambda s: s.id)
        _rng(seed, name).shuffle(group)
        size = len(group)
        if n_train is None and n_test is None:
            if size < 2:
                raise DataError(f"split: stratum {stratify_by}={name!r} has {size} sample(s); need at least 2")
            k_test = min(size - 1, max(1, round(size * test_fraction)))
            k_train = size - k_test
        else:
            k_train = size - n_test if n_train is None else n_train
            k_test = size - n_train if n_test is None else n_test
            if k_train < 0 or k_test < 0 or k_train + k_test > size:
                raise DataError(
                    f"split: stratum {stratify_by}={name!r} has {size} sample(s), too few for "
                    f"n_train={n_train}, n_test={n_test}"
                )
        if k_train + k_test == 0:
            raise DataError(f"split: stratum {stratify_by}={name!r} would be empty")
        train.extend(group[:k_train])
        test.extend(group[k_train : k_train + k_test])
    return train, test


def take_per_scope(samples: Iterable[Sample], n: int) -> list[Sample]:
    """At most ``n`` samples of each scope, order kept (a split is already shuffled, so this is a seeded subset:
    the first ``n`` of a larger split's test part are a subset of that test part)."""
    if n < 0:
        raise DataError(f"take_per_scope: n must be >= 0, got {n}")
    counts: dict = {}
    kept = []
    for s in samples:
        if counts.get(s.scope, 0) < n:
            kept.append(s)
            counts[s.scope] = counts.get(s.scope, 0) + 1
    return kept
