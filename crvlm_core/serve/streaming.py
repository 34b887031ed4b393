"""Greedy generation with per-token callbacks for the server: :func:`generate_streaming` (streamer, raw logits,
stopping criteria) and :class:`BatchStream`, which turns each decoding step of a batch into per-request events."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention

__all__ = ["BatchStream", "Job", "generate_streaming", "stop_aware_delta"]


@torch.no_grad()
def generate_streaming(handle: ModelHandle, enc: dict, interventions: Sequence[Intervention], max_new_tokens: int,
                       streamer: BaseStreamer | None = None, on_logits=None, stopping_criteria=None) -> torch.Tensor:
    """Greedy generation of one left-padded batch with the interventions on every token — the decoding of
    :func:`crvlm_core.steer.generate.steered_generate` — plus hooks a server needs: ``streamer.put(ids[batch])`` after each
    step, ``on_logits(logits[batch, vocab])`` with each step's raw next-token logits (steered), and
    ``stopping_criteria`` (a transformers ``StoppingCriteria`` or list) to end rows early.

    Returns the generated ids ``[batch, prompt + new]`` on CPU.
    """
    from transformers import StoppingCriteriaList

    from crvlm_core.steer.apply import validated
    from crvlm_core.steer.generate import generate_batch

    table = validated(handle, interventions)
    kwargs: dict[str, Any] = {}
    if streamer is not None:
        kwargs["streamer"] = streamer
    if stopping_criteria is not None:
        crit = stopping_criteria if isinstance(stopping_criteria, (list, tuple)) else [stopping_criteria]
        kwargs["stopping_criteria"] = StoppingCriteriaList(list(crit))
    return generate_batch(handle, enc, table, max_new_tokens, on_logits=on_logits, **kwargs)


@dataclass(eq=False)
class Job:
    """One chat completion waiting for, or in, a batch. Events go to ``sink`` on the request's event loop."""

    model: str
    text: str
    n_prompt_tokens: int
    max_tokens: int
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    cancelled: bool = False
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    done: bool = False

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.sink.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (client left, server shutting down)
            self.cancelled = True


class BatchStream(BaseStreamer):
    """Turns each decoding step of a batch into per-request events: text deltas (decoded incrementally, held back
    while they could be the start of a stop string), logprobs, and the finish reason. Doubles as the stopping
    criterion that ends a row at its own ``max_tokens``, a stop string or EOS. ``server`` is the
    :class:`~crvlm_core.serve.batcher.ModelServer` (its ``decode``, ``logprob_entry`` and ``eos_ids``)."""

    def __init__(self, server, jobs: list[Job]):
        self.server, self.jobs = server, jobs
        self.first = True
        self.logits: torch.Tensor | None = None
        self.want_logprobs = any(j.logprobs for j in jobs)
        self.eos = server.eos_ids

    def on_logits(self, logits: torch.Tensor) -> None:
        self.logits = logits if self.want_logprobs else None

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # transformers hands the prompt ids to the streamer first
            self.first = False
            return
        tokens = value.view(-1).tolist()
        logp = torch.log_softmax(self.logits.float(), -1) if self.logits is not None else None
        for row, (job, tok) in enumerate(zip(self.jobs, tokens)):
            if job.done:
                continue
            if job.cancelled:
                self._drop(job)
                continue
            if tok in self.eos:
                self._flush(job)
                self._finish(job, "stop")
                continue
            job.ids.append(tok)
            entry = self.server.logprob_entry(tok, logp[row], job.top_logprobs) if job.logprobs else None
            text = self.server.decode(job.ids)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                delta, cut = "", None
            else:
                delta, cut = stop_aware_delta(text, job.sent, job.stop)
            job.sent += delta
            job.emit(("token", delta, entry))
            if cut is not None:
                self._finish(job, "stop")
            elif len(job.ids) >= job.max_tokens:
                self._flush(job)
                self._finish(job, "length")

    def _flush(self, job: Job) -> None:
        """Send text held back for a stop string that never came."""
        rest = self.server.decode(job.ids)[len(job.sent):]
        if rest and not rest.endswith("\ufffd"):
            job.sent += rest
            job.emit(("token", rest, None))

    def _drop(self, job: Job) -> None:
        """A job whose client left: no more events; its tokens so far are counted in the server's stats."""
        job.done = True
        self.server.stats["cancelled_tokens"] += len(job.ids)

    def _finish(self, job: Job, reason: str) -> None:
        job.done = True
        job.emit(("done", reason, {"prompt_tokens": job.n_prompt_tokens, "completion_tokens": len(job.ids),
                                   "total_tokens": job.n_prompt_tokens + len(job.ids)}))

    def end(self) -> None:
        for job in self.jobs:
            if job.done:
                continue
            if job.cancelled:
                self._drop(job)
            else:
                self._flush(job)
                self._finish(job, "length")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """StoppingCriteria: rows whose request is finished (or cancelled) are done."""
        return torch.tensor([j.done or j.cancelled for j in self.jobs], dtype=torch.bool, device=input_ids.device)


def stop_aware_delta(text: str, sent: str, stops: list[str]) -> tuple[str, int | None]:
    """``(delta, cut)``: the new text to send after ``sent``, up to a stop string if one appeared (``cut`` is then
    its index), else minus any tail that could begin a stop string."""
    if not stops:
        return text[len(sent):], None
    hits = [i for i in (text.find(s, max(0, len(sent) - len(s) + 1)) for s in stops) if i >= 0]
    if hits:
        cut = min(hits)
        return text[len(sent):cut] if cut > len(sent) else "", cut
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    end = max(len(sent), len(text) - hold)
    return text[len(sent):end], None
