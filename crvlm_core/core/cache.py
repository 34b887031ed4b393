"""The one result cache: every cached computation (activations, evaluations, scores, judge validations, fits) is an
entry ``<folder>/<name>-<key digest>.{json,safetensors}`` keyed by a JSON fingerprint of everything it depends on.

One convention for where: ``cache_dir=None`` or ``False`` → no cache; ``True`` → ``outputs/cache/``; a path → that
folder. Entries are written atomically; an entry that cannot be read back whole is recomputed, never trusted. Entries
are strict JSON: a value holding NaN or ±inf is returned but not stored (the caller's own output names it), and an
older entry holding one is recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from crvlm_core.core.io import NonFiniteError, atomic_save_safetensors, atomic_write_bytes, json_text, sha256_hex
from crvlm_core.core.paths import outputs_dir

__all__ = ["cache_folder", "cached_json", "cached_tensors", "entry_path", "key_digest"]

T = TypeVar("T")


def cache_folder(cache_dir: str | os.PathLike | bool | None) -> Path | None:
    """``None``/``False`` → None (off); ``True`` → ``<outputs>/cache``; a path → that folder."""
    if cache_dir is None or cache_dir is False:
        return None
    return outputs_dir() / "cache" if cache_dir is True else Path(cache_dir)


def key_digest(key: Any) -> str:
    """24 hex digits of the SHA-256 of ``key`` as canonical JSON."""
    return sha256_hex(json.dumps(key, sort_keys=True, default=str))[:24]


def entry_path(cache_dir: str | os.PathLike | bool | None, name: str, key: Any, suffix: str = ".json") -> Path | None:
    """Where the entry ``name`` for ``key`` lives (None when caching is off)."""
    folder = cache_folder(cache_dir)
    return None if folder is None else folder / f"{name}-{key_digest(key)}{suffix}"


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in a cache entry")


def _read_entry(path: Path) -> Any:
    """A cache entry's JSON; ``ValueError`` for broken JSON or a NaN / Infinity in it (written by older versions)."""
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)


def _store(path: Path, obj: Any) -> bool:
    """Write ``obj`` as the entry ``path``; False (nothing written) when it holds NaN or ±inf."""
    try:
        text = json_text(obj, path)
    except NonFiniteError:
        return False
    atomic_write_bytes(path, text.encode("utf-8"))
    return True


def cached_json(cache_dir: str | os.PathLike | bool | None, name: str, key: Any, compute: Callable[[], T],
                encode: Callable[[T], Any] = lambda v: v, decode: Callable[[Any], T] = lambda v: v) -> T:
    """``compute()``'s value, read from the cache when an entry for ``key`` exists and decodes, else computed and
    stored (``encode`` / ``decode`` map it to and from JSON)."""
    path = entry_path(cache_dir, name, key)
    if path is not None and path.is_file():
        try:
            return decode(_read_entry(path)["value"])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass  # a damaged entry is recomputed
    value = compute()
    if path is not None:
        _store(path, {"key": key, "value": encode(value)})
    return value


def cached_tensors(cache_dir: str | os.PathLike | bool | None, name: str, key: Any,
                   compute: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, bool]:
    """``(tensors, meta, from_cache)``: ``compute()`` returns ``(name → tensor, JSON-able meta)``; stored as a
    safetensors file and a JSON sidecar holding the meta and the tensor file's SHA-256 (checked on read)."""
    from safetensors.torch import load

    path = entry_path(cache_dir, name, key, ".safetensors")
    if path is not None and path.is_file():
        try:
            data = path.read_bytes()
            side = _read_entry(path.with_suffix(".json"))
            if side["sha256"] == sha256_hex(data):
                return load(data), side["meta"], True
        except Exception:  # noqa: BLE001 - safetensors raises its own error type; a damaged entry is recomputed
            pass
    tensors, meta = compute()
    if path is not None:
        atomic_save_safetensors(path, tensors)
        if not _store(path.with_suffix(".json"), {"key": key, "meta": meta, "sha256": sha256_hex(path.read_bytes())}):
            path.unlink(missing_ok=True)  # no sidecar, no entry
    return tensors, meta, False
