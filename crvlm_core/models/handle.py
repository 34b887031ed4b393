"""One loaded model behind one handle, whatever its family: the nnsight-wrapped model, its tokenizer/processor,
uniform decoder-layer access and batched left-padded chat inputs; and how a handle is built around an HF model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from crvlm_core.models.specs import FAMILIES

__all__ = ["ModelHandle", "default_device", "quiet", "resolve_path", "wrap_model"]


def resolve_path(obj: Any, dotted: str) -> Any:
    """The attribute at a dotted path (``"model.layers"``) of ``obj``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


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
        model: the nnsight wrapper around ``hf_model``; trace with
            ``handle.model.trace(handle.build_inputs(...), **handle.trace_options())``.
        tokenizer: the text tokenizer (left padding, a pad token set).
        processor: the multimodal processor (``None`` for text-only models).
        layers_path: dotted path from ``hf_model`` to its decoder layers.
        n_layers / hidden_size: of the language model.
        load_seconds: wall time of the load.
        remote: where its traces run: None (here), ``"local"`` (nnsight's simulation of a remote server) or
            ``"ndif"`` (:mod:`crvlm_core.models.remote`). Traces take :meth:`trace_options`.
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
    remote: str | None = None

    # -- structure ---------------------------------------------------------------------------------
    @property
    def layers(self) -> _Layers:
        """nnsight envoys of the decoder layers: ``handle.layers[i].output`` is ``[batch, seq, hidden]``."""
        return _Layers(resolve_path(self.model, self.layers_path), self.n_layers)

    @property
    def torch_layers(self) -> torch.nn.ModuleList:
        """The decoder layers as plain torch modules (for forward hooks)."""
        return resolve_path(self.hf_model, self.layers_path)

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None

    @property
    def needs_image(self) -> bool:
        """Whether the family cannot run without an image (InstructBLIP's Q-Former)."""
        return FAMILIES.get(self.family, FAMILIES["causal"]).needs_image

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
        """Where inputs go: the first parameter's device (CPU for an NDIF handle, whose weights are meta here)."""
        if self.remote == "ndif":
            return torch.device("cpu")
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
        if images is None and self.needs_image:
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
    def trace_options(self) -> dict:
        """Keyword arguments that send a trace where :attr:`remote` says: every trace of the library is opened as
        ``with handle.model.trace(inputs, **handle.trace_options())`` (or ``.generate(...)``; nnsight reads the
        ``with`` line itself, so the call cannot hide in a helper)."""
        from crvlm_core.models.remote import trace_options

        return trace_options(self.remote, self.model)

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


class quiet:
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


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device; ``None``: CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from crvlm_core.models.specs import ModelLoadError

    try:
        device = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} here "
                             "(leave --device out to use the CPU)")
    return device


def wrap_model(spec: str, family: str, hf_model, tokenizer, processor, layers_path: str) -> ModelHandle:
    """A :class:`ModelHandle` around a loaded transformers model (left padding, a pad token set, nnsight-wrapped):
    the one place a handle is built."""
    import nnsight

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with quiet():
        if processor is None:
            wrapped = nnsight.TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
        else:
            wrapped = nnsight.TransformersModel(hf_model, processor=processor, tokenizer=tokenizer, task="image-text-to-text")
    layers = resolve_path(hf_model, layers_path)
    text_cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    hidden = int(getattr(text_cfg, "hidden_size", 0) or getattr(text_cfg, "n_embd", 0))
    return ModelHandle(spec=spec, family=family, hf_model=hf_model, model=wrapped, tokenizer=tokenizer,
                       processor=processor, layers_path=layers_path, n_layers=len(layers), hidden_size=hidden)
