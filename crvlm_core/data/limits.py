"""The prompt-length limit: refuse, before any forward pass, a prompt longer than the model can take (a 10 MB prompt
once tried to allocate 18 GB). Duck-typed on the model handle (``tokenizer``, optional ``format_prompt`` and
``hf_model.config``), so the data stage needs nothing of the models stage."""

from __future__ import annotations

import math
from typing import Any, Iterable

from crvlm_core.data.schema import DataError

__all__ = ["PromptTooLong", "check_images", "check_prompt_lengths", "context_length"]

#: ``tokenizer.model_max_length`` at or above this is transformers' "no limit" placeholder (int(1e30)), not a size.
_SANE_MAX = 10**7
#: Slack on the longest vocabulary entry in the fast character filter: Unicode normalisation may map two characters
#: to one before tokenising, so a token can cover up to about twice its own length of the original text.
_NORMALISATION_SLACK = 2


class PromptTooLong(DataError):
    """A prompt longer than the model's context (or the ``--max-prompt-tokens`` limit)."""


def context_length(handle: Any) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` of its (text) config, else the tokenizer's
    ``model_max_length`` when it is a real size; ``None`` when neither is known."""
    config = getattr(getattr(handle, "hf_model", None), "config", None)
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for cfg in (text, config):
            n = getattr(cfg, "max_position_embeddings", None)
            if isinstance(n, int) and n > 0:
                return n
    n = getattr(getattr(handle, "tokenizer", None), "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < _SANE_MAX else None


def _longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest vocabulary entry: no token covers more of the (normalised) text than this."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab()))
    except (AttributeError, TypeError, ValueError):
        return 0  # unknown vocabulary: no fast filter, every prompt is tokenised


def _count_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _describe(sample: Any, index: int, source: str | None) -> str:
    sid = getattr(sample, "id", None) or f"#{index + 1}"
    return f"sample {sid!r}" + (f" ({source})" if source else "")


def check_images(handle: Any, samples: Iterable[Any], *, source: str | None = None) -> None:
    """Refuse, before any forward pass, samples the model cannot take: pictures for a text-only model, or a sample
    without a picture for a family that cannot run without one (InstructBLIP). Duck-typed: ``handle.is_vlm``,
    ``handle.needs_image`` and ``handle.spec`` where present.

    Raises:
        DataError: one line naming the first such sample, its source and what to use instead.
    """
    samples = [s for s in samples if not isinstance(s, str)]
    is_vlm = getattr(handle, "is_vlm", False)
    spec = getattr(handle, "spec", "the model")
    with_image = next((i for i, s in enumerate(samples) if getattr(s, "image", None) is not None), None)
    if with_image is not None and not is_vlm:
        n = sum(getattr(s, "image", None) is not None for s in samples)
        raise DataError(f"{_describe(samples[with_image], with_image, source)}: {n} sample(s) have a picture but "
                        f"{spec} is a text-only model: use a vision-language model (e.g. --model "
                        "llava-dinov2-qwen2.5-0.5b) or text-only data")
    without = next((i for i, s in enumerate(samples) if getattr(s, "image", None) is None), None)
    if without is not None and getattr(handle, "needs_image", False):
        raise DataError(f"{_describe(samples[without], without, source)}: no picture, and {spec} cannot run without "
                        "one: give every sample an image")


def check_prompt_lengths(handle: Any, samples: Iterable[Any], limit: int | None = None, *,
                         source: str | None = None) -> list[int]:
    """Refuse any prompt whose chat-formatted text has more than ``limit`` tokens.

    A prompt is formatted as the model sees it (``handle.format_prompt``, with the image placeholder when the sample
    has an image; the image's own feature tokens are not counted) and tokenised with ``handle.tokenizer``. A prompt
    of more than ``2 × longest-vocabulary-entry × limit`` characters is refused without tokenising it (it certainly
    has more than ``limit`` tokens), so a huge prompt costs nothing.

    Args:
        handle: a model handle, or any object with a ``tokenizer`` (and optionally ``format_prompt``, ``hf_model``).
        samples: :class:`~crvlm_core.data.schema.Sample` objects (or plain prompt strings).
        limit: the most tokens a prompt may have; ``None`` → the model's context (:func:`context_length`); when
            that is unknown too, nothing is checked.
        source: where the samples came from (a file name), named in the error.

    Returns:
        The token count of each prompt (empty when nothing was checked).

    Raises:
        PromptTooLong: one line naming the sample, its source, its token count and the limit.
        DataError: a sample the model cannot take (:func:`check_images`).
        DataError: ``limit`` is not a positive integer.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"prompt-length limit must be a positive integer, got {limit!r}: pass --max-prompt-tokens N")
    samples = list(samples)
    check_images(handle, samples, source=source)
    default = limit is None
    limit = context_length(handle) if default else limit
    if limit is None:
        return []
    tokenizer = handle.tokenizer
    fast_chars = _NORMALISATION_SLACK * _longest_token_chars(tokenizer)
    what = "the model's context" if default else "the limit"
    fix = "shorten it or pass --max-prompt-tokens N"
    counts = []
    for i, sample in enumerate(samples):
        prompt = sample if isinstance(sample, str) else sample.prompt
        if fast_chars and len(prompt) > fast_chars * limit:
            n = math.ceil(len(prompt) / fast_chars)
            raise PromptTooLong(f"{_describe(sample, i, source)}: prompt has at least {n} tokens ({len(prompt)} "
                                f"characters); {what} is {limit} tokens: {fix}")
        has_image = getattr(sample, "image", None) is not None
        text = handle.format_prompt(prompt, has_image=has_image) if hasattr(handle, "format_prompt") else prompt
        n = _count_tokens(tokenizer, text)
        if n > limit:
            raise PromptTooLong(f"{_describe(sample, i, source)}: prompt has {n} tokens (chat-formatted); {what} is "
                                f"{limit} tokens: {fix}")
        counts.append(n)
    return counts
