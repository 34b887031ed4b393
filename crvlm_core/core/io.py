"""Atomic artifact writes (temp file in the same folder, then ``os.replace``) and content hashing.

A reader never sees a half-written artifact: either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "file_sha256",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "sha256_hex",
    "write_run_outputs",
]


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
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) to ``path`` atomically.

    Args:
        path: Destination file.
        obj: A JSON-serialisable object. It is serialised before anything touches the disk, so a
            ``TypeError`` for an unserialisable value leaves no file behind.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    text = json.dumps(obj, sort_keys=True, indent=2) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, "torch.Tensor"],  # noqa: F821
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save ``tensors`` in safetensors format to ``path`` atomically.

    Tensors are made contiguous and moved to CPU first (safetensors requires both).

    Args:
        path: Destination file (conventionally ``*.safetensors``).
        tensors: Name → tensor.
        metadata: Optional string → string header metadata.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


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
    atomically. Returns ``out``."""
    out = Path(out)
    atomic_write_json(out / METRICS_JSON, metrics)
    atomic_write_bytes(out / SAMPLES_JSONL, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return out
