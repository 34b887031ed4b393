"""Hub ids and local model folders: an offline check before transformers' minute of retries, the family read from
the config's ``model_type``, and where that model's decoder layers live."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from crvlm_core.models.handle import resolve_path
from crvlm_core.models.specs import FAMILIES, SPECS, Family, ModelLoadError

__all__ = ["find_layers_path", "load_pretrained"]


def find_layers_path(hf_model: torch.nn.Module, family: Family) -> str:
    """The dotted path to ``hf_model``'s decoder layers: the family's known paths first, then the longest layer
    list outside the vision tower."""
    for path in family.layers_paths:
        try:
            mod = resolve_path(hf_model, path)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return path
    # Fallback: the longest ModuleList whose name ends in layers / h (covers unlisted causal LMs).
    best = None
    for name, mod in hf_model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if "vision" in name or "qformer" in name or "visual" in name:
                continue
            if best is None or len(mod) > len(resolve_path(hf_model, best)):
                best = name
    if best is None:
        raise ModelLoadError(f"could not find the decoder layers of {type(hf_model).__name__}; "
                             f"add its path to crvlm_core.models.specs.FAMILIES")
    return best


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt instead of transformers' minute of retries on an offline machine."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def is_pretrained_spec(spec: str) -> bool:
    """Whether ``spec`` is a hub id or a local folder (not a named or built ``tiny-*`` spec)."""
    return spec not in SPECS and not spec.startswith("tiny-")


def load_pretrained(spec: str, dtype: torch.dtype, trust_remote_code: bool, device_map: str | None = None):
    """A hub id or a local folder; the family comes from its config's ``model_type``. ``device_map="auto"``: placed
    over the GPUs (and CPU) by accelerate."""
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    local = Path(spec).expanduser()
    source = str(local) if local.exists() else spec
    if local.exists() and not (local / "config.json").exists():
        raise ModelLoadError(f"{spec} is a folder without config.json: not a transformers model folder")
    if not local.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise ModelLoadError(f"unknown model spec {spec!r}: not a named spec ({', '.join(SPECS)}), "
                             f"not an existing folder, and not a hub id of the form owner/name")
    offline_msg = (f"model {spec!r} is not in the local Hugging Face cache and the hub cannot be reached "
                   f"(this machine is offline). Download it where the hub is reachable "
                   f"(`huggingface-cli download {spec} --local-dir DIR`), copy DIR here and pass DIR as the spec.")
    if not local.exists() and not _in_hf_cache(spec) and not _hub_reachable():
        raise ModelLoadError(offline_msg)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local.exists():
            raise ModelLoadError(f"could not read the model config in {spec}: {err}") from err
        raise ModelLoadError(offline_msg) from None
    model_type = getattr(config, "model_type", "")
    family = FAMILIES.get(model_type, FAMILIES["causal"])
    cls = getattr(transformers, family.auto_class)
    try:
        placed = {"device_map": device_map} if device_map else {}
        model = cls.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **placed)
    except OSError as err:
        raise ModelLoadError(f"could not load the weights of {spec!r}: {err}") from None
    tokenizer = processor = None
    if family.is_vlm:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer, processor, family.name, find_layers_path(model, family)


def ndif_handle(spec: str):
    """A handle whose traces run on NDIF: the model's meta skeleton (config and tokenizer from the hub, no
    weights) wrapped by nnsight; NDIF holds the weights. Only hub ids of text models NDIF serves."""
    from crvlm_core.models.handle import ModelHandle

    if not is_pretrained_spec(spec) or Path(spec).expanduser().exists() or spec.count("/") != 1:
        raise ModelLoadError(f"--remote ndif runs models NDIF hosts, named by hub id (owner/name); {spec!r} is not "
                             "one (built-in and local models run here: --remote local checks a trace is remote-safe)")
    import nnsight
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(spec)
    except OSError as err:
        raise ModelLoadError(f"could not read the config of {spec!r} from the hub: {err}") from None
    family = FAMILIES.get(getattr(config, "model_type", ""), FAMILIES["causal"])
    if family.is_vlm:
        raise ModelLoadError(f"{spec} is a vision-language model: --remote ndif takes text models only here")
    wrapped = nnsight.LanguageModel(spec)  # not dispatched: meta tensors, no download of the weights
    hf_model = wrapped._model
    layers_path = find_layers_path(hf_model, family)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelHandle(spec=spec, family=family.name, hf_model=hf_model, model=wrapped, tokenizer=wrapped.tokenizer,
                       processor=None, layers_path=layers_path, n_layers=len(resolve_path(hf_model, layers_path)),
                       hidden_size=int(text_cfg.hidden_size), remote="ndif")
