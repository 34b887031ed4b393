"""The sample schema: one prompt (optionally with an image) tagged with a subject and a scope; JSONL loading with
line-numbered errors, image checks, and a content fingerprint of samples that keys caches."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from crvlm_core.core.errors import InputError
from crvlm_core.core.io import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = ["SCOPES", "DataError", "EmptyDataFile", "Sample", "fingerprint", "read_jsonl"]

SCOPES = ("in", "out")
"""The two scopes a sample can be tagged with."""
_CORE_FIELDS = ("id", "prompt", "subject", "scope", "image")


class DataError(InputError):
    """Bad input data: every error raised by the data stage names the file and, where known, the line."""


class EmptyDataFile(DataError):
    """A data file with no records: empty, or blank lines only."""


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
            detail = " ".join(str(exc).split())
            raise DataError(f"sample {self.id!r}: cannot read image {self.image}: {detail}") from None


def _check_image(path: Path, where: str) -> None:
    from PIL import Image

    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"{where}: image file {what}: {path} (`image` is a path relative to the JSONL file's folder)")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for corrupt files
        detail = " ".join(str(exc).split())
        raise DataError(f"{where}: image cannot be opened: {path} ({type(exc).__name__}: {detail}): "
                        "give a readable PNG/JPEG file") from None


_EXPECTED = "expected one JSON object per line with a non-empty string `prompt` and `subject`"


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """``(line number, text)`` of each non-blank line, decoded as UTF-8 line by line (so a bad byte names its line)."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc}): check its permissions") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}): "
                                "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark
            if line.strip():
                yield lineno, line


def _record(path: Path, lineno: int, line: str) -> dict:
    where = f"{path}:{lineno}"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno}): {_EXPECTED}") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply: {_EXPECTED}") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}: {_EXPECTED}")
    for key in ("prompt", "subject"):
        val = rec.get(key)
        if not isinstance(val, str) or not val.strip():
            what = "missing" if key not in rec else f"empty or not a string ({_short(val)})"
            raise DataError(f"{where}: `{key}` is {what}: {_EXPECTED}")
    return rec


def _short(value, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width] + "..."


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
        DataError: One line naming the file (and the 1-based line number of the first bad record) and what to do:
            no such file, an unreadable, empty or all-blank file, bytes that are not UTF-8, broken JSON, a record
            that is not an object or lacks a string ``prompt`` / ``subject``, a bad ``id``, ``scope`` or image.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" + (" (it is a folder)" if path.is_dir() else "")
                        + ": give a JSONL file or a bundled dataset name")
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        rec = _record(path, lineno, line)
        sid = rec.get("id", f"{path.stem}-{lineno}")
        if not isinstance(sid, str) or not sid.strip():
            raise DataError(f"{where}: `id` must be a non-empty string, got {_short(sid)}")
        if sid in seen:
            raise DataError(f"{where}: duplicate id {sid!r} (first seen on line {seen[sid]}): give each line its own id")
        seen[sid] = lineno
        scope = rec.get("scope")
        if scope is not None and scope not in SCOPES:
            raise DataError(f"{where}: `scope` must be one of {SCOPES} or absent, got {_short(scope)}")
        image = None
        if rec.get("image") is not None:
            if not isinstance(rec["image"], str) or not rec["image"].strip():
                raise DataError(f"{where}: `image` must be a path string, got {_short(rec['image'])}")
            image = (path.parent / rec["image"]).resolve()
            _check_image(image, where)
        extra = {k: v for k, v in rec.items() if k not in _CORE_FIELDS}
        samples.append(Sample(sid, rec["prompt"], rec["subject"], scope, image, extra))
    if not samples:
        what = "empty file" if path.stat().st_size == 0 else "no records (only blank lines)"
        raise EmptyDataFile(f"{path}: {what}: {_EXPECTED}")
    return samples


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
