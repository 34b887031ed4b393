"""Seeded random-weight miniatures of real VLM architectures (LLaVA, Idefics3, InstructBLIP, Qwen2-VL), built
offline: d=64, 2 decoder layers, 32 px images, over SmolLM2's tokenizer read from its embedded GGUF.

Configs are written in code and image processors are the ``*ImageProcessorPil`` classes (torchvision is not needed).
All four families build with transformers 5.23, including ``qwen2_vl`` (its processor takes no video processor,
which avoids the torchvision-only one).
"""

from __future__ import annotations

import copy
import functools

import torch

from crvlm_core.models.embedded import embedded_model_folder
from crvlm_core.models.vlm_parts import (
    VLMParts,
    add_special_tokens,
    finish_model,
    llava_processor,
    wrap_chat_template,
)

__all__ = ["TINY_FAMILIES", "build_tiny_vlm"]

TINY_FAMILIES = ("llava", "idefics3", "instructblip", "qwen2_vl")
"""Families :func:`build_tiny_vlm` can build."""


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


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_cached():
    """SmolLM2's tokenizer from the per-machine converted copy of its GGUF (see crvlm_core.models.embedded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_folder("smollm2-135m"))


def _tiny_tokenizer():
    """A fresh copy of SmolLM2's tokenizer (loaded from GGUF once per process), left padding, pad = eos."""
    tok = copy.deepcopy(_smollm2_tokenizer_cached())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _text_sizes(tok) -> dict:
    """The miniature language model's sizes and special ids, shared by every tiny family's text config."""
    return dict(vocab_size=len(tok), hidden_size=_HIDDEN, intermediate_size=_FFN, num_hidden_layers=_LAYERS,
                num_attention_heads=_HEADS, num_key_value_heads=_HEADS, max_position_embeddings=512,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _llama_text_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_sizes(tok), tie_word_embeddings=True)


def _build_llava(tok) -> VLMParts:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 8
    add_special_tokens(tok, ["<image>"])
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
    processor = llava_processor(tok, _TINY_IMAGE, patch, _CHATML)
    return VLMParts(finish_model(model, tok, [image_id]), processor, "llava", "model.language_model.layers", _TINY_IMAGE)


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
    add_special_tokens(tok, specials)
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
    return VLMParts(finish_model(model, tok, suppress), processor, "idefics3", "model.text_model.layers", _TINY_IMAGE)


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
    add_special_tokens(tok, ["<image>"])
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
        finish_model(model, tok, [image_id]), processor, "instructblip", "language_model.model.layers", _TINY_IMAGE
    )


def _build_qwen2_vl(tok) -> VLMParts:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch, merge = 8, 2
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    add_special_tokens(tok, specials)
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
        finish_model(model, tok, list(ids.values())), processor, "qwen2_vl", "model.language_model.layers", _TINY_IMAGE
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
