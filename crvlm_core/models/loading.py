"""Load any supported model once per process behind one :class:`~crvlm_core.models.handle.ModelHandle`: dispatch a
spec to the embedded GGUF models, the refusal organisms, the LLaVA composites, the tiny VLMs or a hub id / folder.

Specs: the embedded default ``qwen2.5-0.5b`` and ``smollm2-135m`` (GGUFs shipped in PyPI wheels, converted once per
machine to a safetensors cache), ``tiny-*`` random-weight VLMs, ``llava-*`` composites that wrap the real LMs, and
any hub id or local folder (family detected from its config). Family differences are data: see
:data:`crvlm_core.models.specs.FAMILIES`.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from crvlm_core.models.embedded import embedded_model_folder, load_causal_folder
from crvlm_core.models.handle import ModelHandle, default_device, quiet, wrap_model
from crvlm_core.models.llava import build_llava_around
from crvlm_core.models.organism import load_organism_model
from crvlm_core.models.pretrained import is_pretrained_spec, load_pretrained, ndif_handle
from crvlm_core.models.remote import check_remote
from crvlm_core.models.specs import COMPOSITES, DEFAULT_MODEL, EMBEDDED, ORGANISMS, SEEING, ModelLoadError
from crvlm_core.models.tiny_vlms import TINY_FAMILIES, build_tiny_vlm


__all__ = ["load_model", "on_remote", "unload_model"]

_CACHE: dict[tuple, ModelHandle] = {}


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False, seed: int = 0, reload: bool = False, *,
               device_map: str | None = None, remote: str | None = None) -> ModelHandle:
    """Load a model spec once per process and return its :class:`ModelHandle`.

    Args:
        spec: a named spec (see :data:`crvlm_core.models.specs.SPECS`), a hub id (``llava-hf/llava-1.5-7b-hf``) or a local folder.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available, else CPU).
        dtype: torch dtype or its name (default float32; pass ``"bfloat16"`` on a GPU for 7B models).
        trust_remote_code: passed to transformers for hub/local models only; off unless you ask.
        seed: seed of the random parts of ``tiny-*`` and ``llava-*`` specs.
        reload: bypass the per-process cache.
        device_map: ``"auto"`` spreads a hub/local model over the GPUs (and CPU) with accelerate, for a model larger
            than one GPU; ``device`` is then ignored. Not for the embedded and built specs (they fit anywhere).
        remote: where the handle's traces run (:mod:`crvlm_core.models.remote`): ``"local"`` (nnsight's simulation
            of a remote server, on the weights loaded here) or ``"ndif"`` (a hub id NDIF serves; only the meta
            skeleton is built here, no weights). The handle shares the loaded model with the plain one.
    """
    remote = check_remote(remote)
    if remote == "ndif":
        return ndif_handle(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("model spec must be a non-empty string, e.g. 'qwen2.5-0.5b'")
    device = default_device(device)
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError as err:
            raise ValueError(f"unknown dtype {dtype!r}") from err
    dtype = dtype or torch.float32
    if device_map not in (None, "auto"):
        raise ModelLoadError(f"device_map must be 'auto' or None, got {device_map!r}")
    if device_map and not is_pretrained_spec(spec):
        raise ModelLoadError(f"--device-map auto is for hub ids and local folders; {spec!r} is a built-in spec "
                             "(use --device)")
    key = (spec, "auto" if device_map else str(device), str(dtype), seed, trust_remote_code)
    if not reload and key in _CACHE:
        return _with_remote(_CACHE[key], remote)
    start = time.perf_counter()
    with quiet():
        hf_model, tokenizer, processor, family, layers_path = _load_parts(spec, dtype, trust_remote_code, seed,
                                                                          device_map)
    if not device_map:  # accelerate placed a device-mapped model already
        hf_model = hf_model.to(device=device, dtype=dtype)
    hf_model = hf_model.eval()
    hf_model.requires_grad_(False)
    handle = wrap_model(spec, family, hf_model, tokenizer, processor, layers_path)
    handle.load_seconds = time.perf_counter() - start
    if device_map:  # accelerate's placement (it records none when everything fits one device)
        handle.info["device_map"] = dict(getattr(hf_model, "hf_device_map", None) or {"": str(handle.device)})
    _CACHE[key] = handle
    return _with_remote(handle, remote)


def _with_remote(handle: ModelHandle, remote: str | None) -> ModelHandle:
    """The cached handle, or a copy sharing its model whose traces run where ``remote`` says."""
    return handle if remote is None else replace(handle, remote=remote)


def on_remote(handle: ModelHandle, remote: str | None) -> ModelHandle:
    """``handle`` (e.g. a LoRA baseline's merged copy, built here) with its traces run where ``remote`` says; NDIF
    cannot run weights that exist only here."""
    if remote == handle.remote:
        return handle
    if remote == "ndif":
        raise ModelLoadError(f"--remote ndif: {handle.spec}'s adapted weights exist only on this machine (a LoRA "
                             "baseline); evaluate it without --remote")
    return _with_remote(handle, remote)


def unload_model(spec: str | None = None) -> int:
    """Drop ``spec``'s handles (every device, dtype and seed; ``None``: all) from :func:`load_model`'s per-process
    cache and collect garbage, so their weights are freed once the caller holds no reference either. Notebook 04
    frees the text model this way before it loads the vision-language model. Returns how many handles were
    dropped."""
    import gc

    keys = [k for k in _CACHE if spec is None or k[0] == spec]
    for k in keys:
        del _CACHE[k]
    gc.collect()
    return len(keys)


def _load_parts(spec: str, dtype: torch.dtype, trust_remote_code: bool, seed: int, device_map: str | None = None):
    """``(hf_model, tokenizer, processor, family, layers_path)`` of ``spec``, before it is moved and wrapped."""
    if spec in EMBEDDED:
        model, tok = load_causal_folder(embedded_model_folder(spec), dtype)
        return model, tok, None, "causal", "model.layers"
    if spec in ORGANISMS:
        model, tok = load_organism_model(spec, dtype=dtype)
        return model, tok, None, "causal", "model.layers"
    if spec in COMPOSITES:
        # the LLaVA takes the base's decoder tensors and copies its embedding: a base loaded only for that is dropped
        # from the cache again (a base the caller had loaded stays cached), so no second handle lingers
        had_base = any(k[0] == COMPOSITES[spec] for k in _CACHE)
        base = load_model(COMPOSITES[spec], device="cpu", dtype=torch.float32)
        if spec in SEEING:
            from crvlm_core.models.dinov2 import load_dinov2
            from crvlm_core.models.llava_dinov2 import build_llava_dinov2

            parts = build_llava_dinov2(base.hf_model, base.tokenizer, load_dinov2())
        else:
            parts = build_llava_around(base.hf_model, base.tokenizer, seed=seed)
        del base
        if not had_base:
            unload_model(COMPOSITES[spec])
        return parts.model, parts.processor.tokenizer, parts.processor, parts.family, parts.layers_path
    if spec.startswith("tiny-"):
        family = spec.removeprefix("tiny-").replace("-", "_")
        if family not in TINY_FAMILIES:
            raise ModelLoadError(f"unknown tiny spec {spec!r}; available: "
                                 + ", ".join("tiny-" + f.replace("_", "-") for f in TINY_FAMILIES))
        parts = build_tiny_vlm(family, seed=seed)
        return parts.model, parts.processor.tokenizer, parts.processor, parts.family, parts.layers_path
    return load_pretrained(spec, dtype, trust_remote_code, device_map=device_map)

