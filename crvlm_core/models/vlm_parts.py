"""What every offline VLM builder shares: the :class:`VLMParts` it returns, the chat-template prelude that renders
image parts as the family's placeholder, special-token and generation set-up, and a LLaVA processor over CLIP."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, ProcessorMixin

__all__ = ["VLMParts", "add_special_tokens", "clip_image_processor", "finish_model", "llava_processor",
           "wrap_chat_template"]


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


def add_special_tokens(tok, tokens: list[str]) -> None:
    """Add ``tokens`` to ``tok`` as special tokens (never split, skipped in decoding), keeping its other extras."""
    from transformers import AddedToken

    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, normalized=False, special=True) for t in tokens]},
        replace_extra_special_tokens=False,
    )


def finish_model(model: PreTrainedModel, tok, suppress: list[int]) -> PreTrainedModel:
    """``model`` in float32 eval mode, its generation config on ``tok``'s special ids, ``suppress`` never generated."""
    model = model.float().eval()
    gc = model.generation_config
    gc.pad_token_id = tok.pad_token_id
    gc.eos_token_id = tok.eos_token_id
    gc.bos_token_id = tok.bos_token_id
    if suppress:
        gc.suppress_tokens = sorted(set(suppress))
    return model


def llava_processor(tok, image_size: int, patch_size: int, template: str, image_token: str = "<image>",
                    strategy: str = "default", mean: list[float] | None = None, std: list[float] | None = None):
    """A LlavaProcessor over a CLIP image processor, with the image token before the text: ``(image_size //
    patch_size)²`` image tokens, plus the CLS token with ``strategy="full"`` (``"default"`` drops it). ``mean`` /
    ``std``: the normalisation, CLIP's unless given (DINOv2: ImageNet's)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = clip_image_processor(CLIPImageProcessorPil, image_size)
    if mean is not None:
        image_processor.image_mean, image_processor.image_std = list(mean), list(std)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token=image_token,
        chat_template=wrap_chat_template(template, image_token),
    )


def clip_image_processor(cls, image_size: int):
    """A CLIP-style image processor of class ``cls`` that resizes and crops to ``image_size`` pixels."""
    return cls(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
