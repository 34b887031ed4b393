"""The request schema of ``POST /v1/chat/completions`` (OpenAI chat completions; unknown fields are accepted and
ignored), its parsing into one :class:`RequestError` per bad request, and a conversation's prompt text."""

from __future__ import annotations

import json
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crvlm_core.models.handle import ModelHandle
from crvlm_core.serve.limits import RequestError

__all__ = ["ChatRequest", "format_messages", "parse_request", "text_of"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)


def _pydantic_error(err: ValidationError) -> RequestError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return RequestError(400, f"missing required field `{loc}`", "missing_field", loc)
    return RequestError(400, f"invalid field `{loc}`: {msg}", "invalid_field", loc)


def text_of(content: str | list[_Part], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise RequestError(400, f"{where}: only text content parts are supported (got type {part.type!r})",
                               "unsupported_content", where)
        texts.append(part.text)
    return "".join(texts)


def format_messages(handle: ModelHandle, messages: Sequence[_Message]) -> str:
    """The chat-formatted prompt text of a conversation, ending where the assistant's answer starts.

    One user turn (plus optional system/developer messages) goes through :meth:`ModelHandle.format_prompt`, as in
    training and evaluation; longer conversations use the tokenizer's chat template (text-only models).
    """
    system = "\n".join(text_of(m.content, f"messages.{i}.content") for i, m in enumerate(messages)
                       if m.role in ("system", "developer"))
    turns = [(i, m) for i, m in enumerate(messages) if m.role not in ("system", "developer")]
    if not turns or turns[-1][1].role != "user":
        raise RequestError(400, "the last non-system message must have role `user`", "invalid_messages", "messages")
    if len(turns) == 1:
        i, m = turns[0]
        return handle.format_prompt(text_of(m.content, f"messages.{i}.content"), system or None)
    if handle.is_vlm:
        raise RequestError(400, f"{handle.spec}: multi-turn conversations are served for text-only models only",
                           "unsupported_conversation", "messages")
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": text_of(m.content, f"messages.{i}.content")} for i, m in turns]
    return handle.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def parse_request(body: bytes) -> ChatRequest:
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(400, f"malformed JSON body: {err}", "invalid_json") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(obj).__name__}", "invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as err:
        raise _pydantic_error(err) from None
