"""The sample schema, JSONL loading with line-numbered errors, images, scopes and seeded splits.

Also the entry point to the bundled offline datasets in ``crvlm_core/datasets/`` (see its SOURCES.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from crvlm_core.core.io import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "DATASETS_DIR",
    "DataError",
    "Sample",
    "assign_scope",
    "fingerprint",
    "list_datasets",
    "load_dataset",
    "read_jsonl",
    "scope_dataset",
    "split",
    "take_per_scope",
]

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
"""Folder of the bundled JSONL datasets (``harmful/`` holds the harmful-request sets)."""

_SCOPES = ("in", "out")
_CORE_FIELDS = ("id", "prompt", "subject", "scope", "image")


class DataError(ValueError):
    """Bad input data: every error raised by this module names the file and, where known, the line."""


@dataclass(frozen=True)
class Sample:
    """One prompt, optionally with an image, tagged with a subject and a scope.

    Attributes:
        id: Unique id within its dataset.
        prompt: The text shown to the model (a plain question or request).
        subject: Subject label used to define scopes (e.g. ``"biology"``).
        scope: ``"in"`` / ``"out"`` once assigned (see :func:`assign_scope`), else ``None``.
        image: Absolute path of the image, or ``None`` for text-only samples.
        extra: Every other field of the JSONL record (choices, answer, source, refused, country, ...).
    """

    id: str
    prompt: str
    subject: str
    scope: str | None = None
    image: Path | None = None
    extra: dict = field(default_factory=dict, hash=False)

    def load_image(self) -> "PILImage.Image | None":
        """Open the sample's image as RGB.

        Returns:
            An RGB PIL image, or ``None`` when the sample has no image.

        Raises:
            DataError: If the image file is missing or cannot be decoded.
        """
        if self.image is None:
            return None
        from PIL import Image

        try:
            with Image.open(self.image) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DataError(f"sample {self.id!r}: cannot read image {self.image}: {exc}") from exc


def _check_image(path: Path, where: str) -> None:
    from PIL import Image

    if not path.is_file():
        raise DataError(f"{where}: image file does not exist: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataError(f"{where}: image cannot be opened: {path} ({type(exc).__name__}: {exc})") from exc


def read_jsonl(path: str | Path) -> list[Sample]:
    """Read a JSONL file of samples, one JSON object per line.

    Required keys: ``prompt`` and ``subject`` (non-empty strings). ``id`` defaults to
    ``f"{file_stem}-{lineno}"``. ``image`` is a path relative to the JSONL file (or absolute) and
    is checked with ``PIL.Image.verify`` here. ``scope`` must be ``"in"``, ``"out"`` or absent.
    Every other key goes into :attr:`Sample.extra`. Blank lines are skipped.

    Args:
        path: The JSONL file.

    Returns:
        The samples in file order.

    Raises:
        DataError: Naming the file and the 1-based line number of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            sid = rec.get("id", f"{path.stem}-{lineno}")
            if not isinstance(sid, str) or not sid.strip():
                raise DataError(f"{where}: `id` must be a non-empty string, got {sid!r}")
            for key in ("prompt", "subject"):
                val = rec.get(key)
                if not isinstance(val, str) or not val.strip():
                    what = "missing" if key not in rec else f"empty or not a string ({val!r})"
                    raise DataError(f"{where}: `{key}` is {what}")
            if sid in seen:
                raise DataError(f"{where}: duplicate id {sid!r} (first seen on line {seen[sid]})")
            seen[sid] = lineno
            scope = rec.get("scope")
            if scope is not None and scope not in _SCOPES:
                raise DataError(f"{where}: `scope` must be one of {_SCOPES} or absent, got {scope!r}")
            image = None
            if rec.get("image") is not None:
                if not isinstance(rec["image"], str) or not rec["image"].strip():
                    raise DataError(f"{where}: `image` must be a path string, got {rec['image']!r}")
                image = (path.parent / rec["image"]).resolve()
                _check_image(image, where)
            extra = {k: v for k, v in rec.items() if k not in _CORE_FIELDS}
            samples.append(Sample(sid, rec["prompt"], rec["subject"], scope, image, extra))
    return samples


def _bundled() -> dict[str, Path]:
    return {p.stem: p for p in sorted(DATASETS_DIR.rglob("*.jsonl"))}


#: Datasets assembled from bundled ones: name → ((bundled name, seeded cap per subject or None), ...).
#: ``refusal-topics``: political 64 + neutral 64 + 64 harmful requests (Refusal Steering's three subjects).
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
    for scope in _SCOPES:
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


def fingerprint(samples: Iterable[Sample]) -> str:
    """A stable content hash of samples, to key caches.

    Covers, in order, each sample's id, prompt, subject, scope, extra fields and the SHA-256 of its
    image bytes (not the image path, so moving the data folder keeps the fingerprint).

    Args:
        samples: The samples; order matters.

    Returns:
        The first 16 hex characters of a SHA-256 digest.
    """
    h = hashlib.sha256()
    for s in samples:
        rec = {
            "id": s.id,
            "prompt": s.prompt,
            "subject": s.subject,
            "scope": s.scope,
            "image": None if s.image is None else file_sha256(Path(s.image)),
            "extra": s.extra,
        }
        h.update(json.dumps(rec, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
