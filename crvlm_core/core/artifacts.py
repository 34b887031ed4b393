"""The artifact contract: everything fitted (a vector, a CR-VLM calibrator with its gate, a baseline, a
refusal-steering vector with its gate, a policy, an organism adapter) is one folder: ``artifact.json`` + tensors.

``artifact.json`` = {``kind``, ``format_version``, ``config`` (the method's settings), ``model`` (spec, hidden size,
layer count), ``inputs`` (SHA-256 of the training inputs and settings), ``files`` (path → SHA-256 of every other
file in the folder)}. :func:`write_artifact` builds the folder beside its target and renames it into place, so a
reader sees the old folder or the whole new one; :func:`read_manifest` checks every hash before anything is used.
Which code loads which ``kind`` is the methods layer's registry (``crvlm_core.methods.loading``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from crvlm_core.core.errors import InputError
from crvlm_core.core.io import atomic_write_bytes, file_sha256, json_text, sha256_hex

__all__ = [
    "ARTIFACT_JSON", "FIT_JSON", "FORMAT_VERSION", "ArtifactError", "ArtifactExists", "check_model",
    "check_writable", "fingerprint", "model_info", "read_manifest", "write_artifact",
]

FORMAT_VERSION = 1
ARTIFACT_JSON = "artifact.json"
FIT_JSON = "fit.json"  # the CLI's summary of a fit, kept beside artifact.json for older readers


class ArtifactError(InputError):
    """A folder that is not a usable artifact: missing, damaged, of another format, or for another model."""


class ArtifactExists(ArtifactError):
    """The target folder already holds something and ``force`` was not given."""


def fingerprint(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys): the key of training inputs and settings."""
    return sha256_hex(json.dumps(obj, sort_keys=True, default=str))


def model_info(handle) -> dict:
    """What an artifact records of the model it belongs to (any object with ``spec``, ``hidden_size``,
    ``n_layers``; ``key`` names a variant such as an organism or a composite build)."""
    return {"spec": handle.spec, "key": getattr(handle, "key", handle.spec),
            "hidden_size": int(handle.hidden_size), "n_layers": int(handle.n_layers)}


def check_writable(folder: str | os.PathLike, force: bool = False) -> Path:
    """Raise :class:`ArtifactExists` unless ``folder`` is absent, empty, or ``force`` is set (then it is replaced
    whole when the new artifact is complete). Call it before the fit, so nothing runs for a refused folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ArtifactExists(f"{folder} is a file, not an artifact folder: choose another --out")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        what = "holds an artifact" if (folder / ARTIFACT_JSON).exists() or (folder / FIT_JSON).exists() else \
            "is not empty"
        raise ArtifactExists(f"{folder} {what}: choose another --out, or give --force to replace it whole")
    return folder


def _files_of(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / ARTIFACT_JSON}


def write_artifact(folder: str | os.PathLike, kind: str, write_files: Callable[[Path], None], *,
                   config: dict, model: dict, inputs: dict | str, force: bool = False,
                   extra_json: dict[str, Any] | None = None) -> Path:
    """Write an artifact folder whole: ``write_files(tmp)`` fills a temporary folder beside ``folder`` with the
    tensors and any other files, the manifest is added with every file's SHA-256, and the temporary folder is
    renamed to ``folder`` (an existing one, allowed by ``force``, is replaced only then). ``extra_json`` maps file
    names to JSON objects written into the folder too (the CLI's ``fit.json`` summary), hashed like the rest.

    Raises:
        ArtifactExists: ``folder`` is not empty and ``force`` is false (nothing is written).
    """
    folder = check_writable(folder, force)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_files(tmp)
        for name, obj in (extra_json or {}).items():  # strict JSON; an error names the file in ``folder``
            atomic_write_bytes(tmp / name, json_text(obj, folder / name).encode("utf-8"))
        manifest = {"kind": kind, "format_version": FORMAT_VERSION, "config": config, "model": model,
                    "inputs": inputs if isinstance(inputs, str) else fingerprint(inputs), "files": _files_of(tmp)}
        atomic_write_bytes(tmp / ARTIFACT_JSON, json_text(manifest, folder / ARTIFACT_JSON).encode("utf-8"))
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def read_manifest(folder: str | os.PathLike, kinds: tuple[str, ...] | None = None) -> dict:
    """``artifact.json`` of ``folder`` after checking the format version and the SHA-256 of every file it lists.

    Raises:
        ArtifactError: one line naming the folder or file and what to do (no folder, an older format, broken JSON,
            a missing or changed file, a kind not in ``kinds``).
    """
    folder = Path(folder)
    path = folder / ARTIFACT_JSON
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not an artifact folder (no such folder): give a `crvlm fit --out` folder")
    if not path.is_file():
        old = " written by crvlm before artifact.json existed: re-fit it (see CHANGELOG.md)" \
            if (folder / FIT_JSON).exists() else ""
        raise ArtifactError(f"{folder} has no {ARTIFACT_JSON}: not a crvlm artifact{old}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}): re-fit the artifact with --force") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or "kind" not in manifest:
        raise ArtifactError(f"{path} is not an artifact manifest (needs kind, format_version, files): re-fit it")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
                            "re-fit it with this crvlm")
    if kinds is not None and manifest["kind"] not in kinds:
        raise ArtifactError(f"{folder} holds a {manifest['kind']!r} artifact; expected {' or '.join(kinds)}")
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing (listed in {ARTIFACT_JSON}): the folder is incomplete; re-fit it")
        if file_sha256(file) != digest:
            raise ArtifactError(f"{file} was changed or damaged (SHA-256 differs from {ARTIFACT_JSON}); "
                                "re-fit with --force")
    return manifest


def check_model(manifest: dict, handle, folder: str | os.PathLike = "artifact") -> None:
    """Raise :class:`ArtifactError` unless ``handle`` has the hidden size and layer count the artifact was fitted
    on."""
    want = manifest.get("model") or {}
    got = model_info(handle)
    if (want.get("hidden_size"), want.get("n_layers")) != (got["hidden_size"], got["n_layers"]):
        raise ArtifactError(f"{folder} was fitted on {want.get('spec')!r} (hidden size {want.get('hidden_size')}, "
                            f"{want.get('n_layers')} layers); {got['spec']!r} has {got['hidden_size']} / "
                            f"{got['n_layers']}: use --model {want.get('spec')}")
