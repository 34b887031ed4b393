"""Atomic artifact writes (temp file in the same folder, then ``os.replace``) and content hashing.

A reader never sees a half-written artifact: either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from crvlm_core.core.errors import InputError

__all__ = [
    "NonFiniteError",
    "file_sha256",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "json_text",
    "nan_to_none",
    "sha256_hex",
    "strict_dumps",
    "write_run_outputs",
]


class NonFiniteError(InputError):
    """A NaN or infinite number on its way into a JSON file (JSON has neither): nothing is written."""


def nan_to_none(value: Any) -> Any:
    """``None`` for a float NaN (a quantity that was not measured, e.g. a rate over no samples), else ``value``:
    what a writer stores as JSON ``null``. Infinities are kept, so a writer refuses them (:class:`NonFiniteError`)."""
    return None if isinstance(value, float) and math.isnan(value) else value


def _first_non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "the value", obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = _first_non_finite(value, f"{where}[{key}]" if isinstance(key, int) else
                                  f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def strict_dumps(obj: Any, where: str | os.PathLike, **kwargs: Any) -> str:
    """``json.dumps(obj, allow_nan=False, **kwargs)``: valid JSON only.

    Raises:
        NonFiniteError: one line naming ``where`` (the file being written) and the key holding NaN or ±inf.
        TypeError: a value JSON cannot hold.
    """
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        found = _first_non_finite(obj)
        if found is None:
            raise
        key, value = found
        raise NonFiniteError(f"{where}: cannot write {key} = {value} (JSON has no NaN or Infinity); nothing was "
                             "written: check the option or input that produced it (e.g. --alpha)") from None


def json_text(obj: Any, where: str | os.PathLike) -> str:
    """The text :func:`atomic_write_json` writes: strict JSON, sorted keys, indent 2, trailing newline."""
    return strict_dumps(obj, where, sort_keys=True, indent=2) + "\n"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically.

    The bytes go to a temporary file in the same directory (so ``os.replace`` is a same-filesystem
    rename), are flushed and fsynced, and the temporary file then replaces ``path``. Parent
    directories are created. If anything fails, the temporary file is removed and any previous
    file at ``path`` is left untouched.

    Args:
        path: Destination file.
        data: The complete file contents.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; keep an existing file's mode, else use the usual 0644.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as strict JSON (sorted keys, indent 2, trailing newline; no NaN or Infinity) to ``path``
    atomically.

    Args:
        path: Destination file.
        obj: A JSON-serialisable object. It is serialised before anything touches the disk, so a
            ``TypeError`` for an unserialisable value, or a :class:`NonFiniteError` for NaN / ±inf (write ``None``
            for "not measured", see :func:`nan_to_none`), leaves no file behind.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    return atomic_write_bytes(path, json_text(obj, path).encode("utf-8"))


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, "torch.Tensor"],  # noqa: F821
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``tensors`` in safetensors format to ``path`` atomically, byte-identical for the same tensors and
    metadata.

    Tensors are made contiguous and moved to CPU first (safetensors requires both). safetensors writes the metadata
    entries in an order that varies between processes; the header is rewritten with them sorted.

    Args:
        path: Destination file (conventionally ``*.safetensors``).
        tensors: Name → tensor.
        metadata: Optional string → string header metadata.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata=None if metadata is None else dict(sorted(metadata.items())))
    return atomic_write_bytes(path, _sorted_metadata(data))


def _sorted_metadata(data: bytes) -> bytes:
    """A safetensors file with its header's ``__metadata__`` entries in sorted order (the rest as written), padded
    with spaces to the same header length (safetensors pads its header with spaces too)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if len(header.get("__metadata__") or {}) < 2:
        return data
    header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > size:  # cannot happen: the same entries in another order; keep safetensors' bytes
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size:]


def sha256_hex(*parts: bytes | str) -> str:
    """SHA-256 hex digest of the given parts, unambiguously framed.

    Each part is UTF-8 encoded if it is a ``str`` and prefixed with its byte length, so
    ``sha256_hex("ab", "c") != sha256_hex("a", "bc")``. The digest is stable across runs and
    platforms.

    Args:
        *parts: Strings and/or bytes.

    Returns:
        64 lowercase hex characters.

    Raises:
        TypeError: If a part is neither ``str`` nor ``bytes``.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, str):
            part = part.encode("utf-8")
        elif not isinstance(part, (bytes, bytearray, memoryview)):
            raise TypeError(f"sha256_hex parts must be str or bytes, got {type(part).__name__}")
        part = bytes(part)
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def file_sha256(path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


METRICS_JSON = "metrics.json"
SAMPLES_JSONL = "samples.jsonl"


def write_run_outputs(out: str | os.PathLike, metrics: dict, rows: list[dict]) -> Path:
    """Write an evaluation's ``metrics.json`` and ``samples.jsonl`` (one JSON row per line) into ``out``, each
    atomically and as strict JSON. Both are serialised before either is written, so a NaN / ±inf anywhere
    (:class:`NonFiniteError`, naming the file, the line and the key) leaves ``out`` as it was. Returns ``out``."""
    out = Path(out)
    metrics_text = json_text(metrics, out / METRICS_JSON)
    samples_text = "".join(strict_dumps(r, f"{out / SAMPLES_JSONL}:{i}", ensure_ascii=False) + "\n"
                           for i, r in enumerate(rows, start=1))
    atomic_write_bytes(out / METRICS_JSON, metrics_text.encode("utf-8"))
    atomic_write_bytes(out / SAMPLES_JSONL, samples_text.encode("utf-8"))
    return out
