"""LLaVA composites around a real causal LM: a small seeded CLIP vision tower and projector over the LM's own
decoder tensors (one copy of the weights), the tokenizer's own image placeholder where it has one."""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from crvlm_core.models.vlm_parts import VLMParts, add_special_tokens, finish_model, llava_processor

__all__ = ["LLAVA_AROUND_BUILD", "build_llava_around", "composite_tokenizer", "finish_composite", "text_config"]

LLAVA_AROUND_BUILD = "llava-around-2"
"""How :func:`build_llava_around` builds a composite; a change that alters its outputs changes this (it keys caches).
2: the image token is the tokenizer's own placeholder where it has one, and the vision tower is initialised alone."""

# Image placeholders a text tokenizer may already have (a row of its embedding): reused as the LLaVA image token.
_IMAGE_PLACEHOLDERS = ("<image>", "<|image_pad|>")


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
    old_vocab = language_model.get_input_embeddings().weight.shape[0]
    tok, image_token, image_id = composite_tokenizer(tokenizer, old_vocab)
    new_vocab = max(old_vocab, image_id + 1)
    lm_config, tied = text_config(language_model, new_vocab)
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
        text_config=lm_config,
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
    _init_vision(model, seed)
    processor = llava_processor(tok, image_size, patch_size, tok.chat_template, image_token)
    return finish_composite(model, language_model, processor, image_id, new_vocab, tied, image_size)


def finish_composite(model, language_model: PreTrainedModel, processor, image_id: int, new_vocab: int, tied: bool,
                     image_size: int) -> VLMParts:
    """The last steps of every LLaVA composite: the meta-device ``model`` (vision parts already real) takes the LM's
    own tensors, is put in float32 eval mode with ``image_id`` never generated, and keeps the LM's end-of-turn ids."""
    _take_language_model(model, language_model, new_vocab, tied)
    model = finish_model(model, processor.tokenizer, [image_id])
    gen = language_model.generation_config
    if gen is not None and gen.eos_token_id is not None:
        model.generation_config.eos_token_id = gen.eos_token_id
    return VLMParts(model, processor, "llava", "model.language_model.layers", image_size)


def composite_tokenizer(tokenizer, old_vocab: int):
    """A left-padding copy of ``tokenizer`` and its image token: its own placeholder inside the embedding where it
    has one, else ``<image>`` added. Returns ``(tokenizer, image_token, image_id)``."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ValueError("the tokenizer has no chat_template")
    specials = {str(t): i for i, t in tok.added_tokens_decoder.items() if t.special}  # never split, skipped in decoding
    image_token = next((t for t in _IMAGE_PLACEHOLDERS if specials.get(t, old_vocab) < old_vocab), None)
    if image_token is None:
        image_token = "<image>"
        add_special_tokens(tok, [image_token])
    return tok, image_token, tok.convert_tokens_to_ids(image_token)


def text_config(language_model: PreTrainedModel, new_vocab: int):
    """The LM's config for the composite's language model (``new_vocab`` rows, no quantization) and whether its
    output layer is tied to its embedding."""
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
    return text_config, tied


def _init_vision(model, seed: int) -> None:
    """Materialise the vision tower and projector of a meta-device LLaVA and initialise them after ``seed``."""
    vision, projector = model.model.vision_tower, model.model.multi_modal_projector
    vision.to_empty(device="cpu")
    projector.to_empty(device="cpu")
    torch.manual_seed(seed)
    vision.initialize_weights()
    projector.apply(model._initialize_weights)


def _take_language_model(model, language_model: PreTrainedModel, new_vocab: int, tied: bool) -> None:
    """Give the meta-device LLaVA the LM's own decoder tensors, buffers and output layer (padded copies only where
    the vocabulary grew); raise if any tensor is left without a value."""
    old_vocab = language_model.get_input_embeddings().weight.shape[0]
    out = language_model.get_output_embeddings()
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


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if weight.shape[0] >= rows:
        return weight
    pad = weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)
