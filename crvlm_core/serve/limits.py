"""What one request to ``crvlm serve`` may ask for and how requests are batched (:class:`ServeLimits`), and the
client error every bound answers with (:class:`RequestError`, an OpenAI-style JSON error with an HTTP status)."""

from __future__ import annotations

from dataclasses import dataclass

from crvlm_core.core.fields import int_field

__all__ = ["RequestError", "ServeLimits"]


@dataclass
class ServeLimits:
    """Bounds on what one request may ask for and how requests are batched.

    Attributes:
        max_body_bytes: larger request bodies get 413.
        max_prompt_chars / max_prompt_tokens: the formatted conversation's size; larger gets 400
            ``context_length_exceeded``.
        max_tokens: the largest ``max_tokens`` a request may ask for (larger gets 400).
        default_max_tokens: used when a request gives none.
        max_batch_size: requests generated together at most.
        batch_window_ms: how long the worker waits for more requests after the first of a batch arrives.
        max_queue: requests waiting at most; more get 503 ``server_busy``.
        max_top_logprobs: the largest ``top_logprobs`` (OpenAI allows 20).
    """

    max_body_bytes: int = 1_000_000
    max_prompt_chars: int = 16_000
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    max_queue: int = 64
    max_top_logprobs: int = 20

    def __post_init__(self):
        for name in ("max_body_bytes", "max_prompt_chars", "max_prompt_tokens", "max_tokens", "default_max_tokens",
                     "max_batch_size", "max_queue"):
            int_field(self, name, prefix="ServeLimits.")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("ServeLimits.default_max_tokens must not exceed max_tokens")
        if self.batch_window_ms < 0:
            raise ValueError("ServeLimits.batch_window_ms must be >= 0")


class RequestError(Exception):
    """A client error, answered as ``{"error": {...}}`` with an HTTP status (never a server crash)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
