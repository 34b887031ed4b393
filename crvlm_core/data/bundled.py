"""The bundled offline datasets in ``crvlm_core/datasets/`` (see its SOURCES.md): their names, the combined sets
built from them, and loading one by name (or a user's JSONL by path) with subject selection and a seeded cap."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

from crvlm_core.data.schema import DataError, Sample, read_jsonl

__all__ = ["COMBINED", "DATASETS_DIR", "list_datasets", "load_dataset"]

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
"""Folder of the bundled JSONL datasets (``harmful/`` holds the harmful-request sets)."""


def _bundled() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATASETS_DIR.rglob("*.jsonl"))}


#: Datasets assembled from bundled ones: name → ((bundled name, seeded cap per subject or None), ...).
#: ``refusal-topics``: political 64 + neutral 64 + 64 harmful requests (Refusal Steering's three subjects).
#: ``political_wide`` (political 160 + neutral 160, 43 countries; found by its file stem like every bundled set) is
#: deliberately not part of it: it is #27's larger held-out set, never trained or tuned on.
COMBINED: dict[str, tuple[tuple[str, int | None], ...]] = {
    "refusal-topics": (("political", None), ("harmful", 64)),
}


def list_datasets() -> list[str]:
    """Names of the bundled datasets, accepted by :func:`load_dataset`.

    Returns:
        Sorted dataset names (file stems under ``crvlm_core/datasets/``).
    """
    return sorted([*_bundled(), *COMBINED])


def load_dataset(
    name_or_path: str | Path,
    subjects: list[str] | None = None,
    limit_per_subject: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """Load a bundled dataset by name, or a user's JSONL file by path.

    Args:
        name_or_path: A name from :func:`list_datasets` or a path to a JSONL file.
        subjects: Keep only these subjects (in file order). Unknown names raise.
        limit_per_subject: Keep at most this many samples per subject, chosen at random with
            ``seed`` (file order is preserved among the kept ones).
        seed: Seed for the per-subject subsampling.

    Returns:
        The samples.

    Raises:
        DataError: Unknown dataset, unknown subject, bad limit, or any error of :func:`read_jsonl`.
    """
    bundled = _bundled()
    if isinstance(name_or_path, str) and name_or_path in COMBINED:
        samples = [s for part, cap in COMBINED[name_or_path]
                   for s in load_dataset(part, limit_per_subject=cap, seed=seed)]
        return _select(samples, name_or_path, subjects, limit_per_subject, seed)
    if isinstance(name_or_path, str) and name_or_path in bundled:
        path = bundled[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise DataError(
                f"unknown dataset {str(name_or_path)!r}: not a bundled name ({', '.join(list_datasets())}) "
                "nor an existing JSONL file"
            )
    return _select(read_jsonl(path), path, subjects, limit_per_subject, seed)


def _select(samples: list[Sample], path, subjects: list[str] | None, limit_per_subject: int | None,
            seed: int) -> list[Sample]:
    if subjects is not None:
        available = sorted({s.subject for s in samples})
        unknown = sorted(set(subjects) - set(available))
        if unknown:
            raise DataError(f"{path}: unknown subject(s) {unknown}; available: {available}")
        keep = set(subjects)
        samples = [s for s in samples if s.subject in keep]
    if limit_per_subject is not None:
        if limit_per_subject < 1:
            raise DataError(f"{path}: limit_per_subject must be >= 1, got {limit_per_subject}")
        by_subject: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(samples):
            by_subject[s.subject].append(i)
        rng = random.Random(seed)
        chosen: set[int] = set()
        for subj in sorted(by_subject):
            idx = by_subject[subj]
            chosen.update(idx if len(idx) <= limit_per_subject else rng.sample(idx, limit_per_subject))
        samples = [s for i, s in enumerate(samples) if i in chosen]
    return samples
