"""The model server: one worker thread owns the model; queued chat-completion jobs are generated together as
left-padded micro-batches, one batch per served model name (:class:`ModelServer`)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import torch

from crvlm_core.models.handle import ModelHandle
from crvlm_core.serve.limits import RequestError, ServeLimits
from crvlm_core.serve.schema import ChatRequest, format_messages, text_of
from crvlm_core.serve.streaming import BatchStream, Job, generate_streaming
from crvlm_core.steer.base import Intervention

__all__ = ["ModelServer"]


class ModelServer:
    """Owns the model and a worker thread; requests are queued as jobs and generated in micro-batches.

    Args:
        handle: the loaded model.
        variants: served model name → interventions (``[]`` = unsteered), e.g. from
            :func:`~crvlm_core.serve.variants.load_variants`.
        limits: request bounds and batching (:class:`ServeLimits`).
    """

    def __init__(self, handle: ModelHandle, variants: dict[str, list[Intervention]],
                 limits: ServeLimits | None = None):
        if not variants:
            raise ValueError("ModelServer needs at least one served model name")
        for ivs in variants.values():
            for iv in ivs:
                iv.validate(handle)
        self.handle, self.variants, self.limits = handle, dict(variants), limits or ServeLimits()
        self.created = int(time.time())
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=self.limits.max_queue)
        self._stop = threading.Event()
        self._tok_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self._thread: threading.Thread | None = None
        # cancelled: requests whose client left before the answer; cancelled_tokens: tokens generated for them
        self.stats = {"requests": 0, "batches": 0, "batched_requests": 0, "max_batch": 0, "errors": 0,
                      "cancelled": 0, "cancelled_tokens": 0}
        eos = handle.hf_model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if handle.tokenizer.eos_token_id is not None:
            eos.append(handle.tokenizer.eos_token_id)
        self.eos_ids = set(eos)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> "ModelServer":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="crvlm-serve-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- tokenizer helpers ----------------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.handle.tokenizer.decode(ids, skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        with self._tok_lock:
            return len(self.handle.tokenizer(text, add_special_tokens=self.handle._add_special_tokens(text))["input_ids"])

    def encode(self, texts: list[str]) -> dict:
        """Left-padded batch inputs of already chat-formatted texts (as :meth:`ModelHandle.build_inputs` does)."""
        h = self.handle
        with self._tok_lock:
            add = h._add_special_tokens(texts[0])
            if h.is_vlm:
                h.processor.tokenizer.padding_side = "left"
                enc = h.processor(text=texts, return_tensors="pt", padding=True, add_special_tokens=add)
            else:
                enc = h.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add)
        return {k: (v.to(h.device) if torch.is_tensor(v) else v) for k, v in enc.items()}

    def logprob_entry(self, token: int, logp: torch.Tensor, top: int) -> dict:
        def item(t: int, lp: float) -> dict:
            s = self.decode([t]) if t not in self.eos_ids else ""
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        entry = item(token, float(logp[token]))
        if top > 0:
            vals, idx = logp.topk(top)
            entry["top_logprobs"] = [item(int(i), float(v)) for v, i in zip(vals, idx)]
        else:
            entry["top_logprobs"] = []
        return entry

    # -- requests -------------------------------------------------------------------------------------------------
    def make_job(self, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> Job:
        """Validate a parsed request against the served models and the limits; raises :class:`RequestError`."""
        lim = self.limits
        if req.model not in self.variants:
            raise RequestError(404, f"the model `{req.model}` does not exist here; served: {sorted(self.variants)}",
                               "model_not_found", "model")
        if req.n != 1:
            raise RequestError(400, "only n=1 is supported", "invalid_field", "n")
        max_tokens = req.max_completion_tokens or req.max_tokens or lim.default_max_tokens
        if max_tokens > lim.max_tokens:
            raise RequestError(400, f"max_tokens {max_tokens} exceeds this server's limit of {lim.max_tokens}",
                               "max_tokens_too_large", "max_tokens")
        top = req.top_logprobs or 0
        if top > lim.max_top_logprobs:
            raise RequestError(400, f"top_logprobs must be <= {lim.max_top_logprobs}", "invalid_field", "top_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise RequestError(400, "stop: up to 4 non-empty strings", "invalid_field", "stop")
        chars = sum(len(text_of(m.content, "messages")) for m in req.messages)
        if chars > lim.max_prompt_chars:
            raise RequestError(400, f"the messages have {chars} characters; this server accepts at most "
                               f"{lim.max_prompt_chars}", "context_length_exceeded", "messages")
        text = format_messages(self.handle, req.messages)
        n_tok = self.count_tokens(text)
        if n_tok > lim.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {n_tok} tokens; this server accepts at most "
                               f"{lim.max_prompt_tokens}", "context_length_exceeded", "messages")
        return Job(req.model, text, n_tok, max_tokens, stop, bool(req.logprobs or top), top, loop, asyncio.Queue())

    def submit(self, job: Job) -> None:
        if not self.alive:
            raise RequestError(503, "the model worker is not running", "server_unavailable", type_="server_error")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.limits.max_queue} requests already queued; retry later",
                               "server_busy", type_="server_error") from None
        self.stats["requests"] += 1

    def cancel(self, job: Job) -> None:
        """Give up a job whose client left (no-op once it finished): a queued job leaves the queue now, a job being
        generated stops at the next token step (its row's stopping criterion), so the worker is free for others."""
        if job.done or job.cancelled:
            return
        job.cancelled = True
        self.stats["cancelled"] += 1
        with self._queue.mutex:  # queue.Queue has no remove(): edit its deque under its own lock
            try:
                self._queue.queue.remove(job)
            except ValueError:  # already taken by the worker
                return
            job.done = True
            self._queue.not_full.notify()

    # -- worker ---------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.limits.batch_window_ms / 1000
            while len(batch) < self.limits.max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
            groups: dict[str, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.model, []).append(job)
            for jobs in groups.values():
                for job in jobs:
                    job.done = job.done or job.cancelled  # cancelled after it left the queue, before generation
                self._generate([j for j in jobs if not j.done])

    def _generate(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(jobs)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(jobs))
        stream = BatchStream(self, jobs)
        try:
            enc = self.encode([j.text for j in jobs])
            generate_streaming(self.handle, enc, self.variants[jobs[0].model], max(j.max_tokens for j in jobs),
                               streamer=stream, on_logits=stream.on_logits, stopping_criteria=stream)
            stream.end()
        except Exception as err:  # one failed batch answers its requests with 500s; the worker goes on
            self.stats["errors"] += 1
            for job in jobs:
                if not job.done and not job.cancelled:
                    job.done = True
                    job.emit(("error", f"{type(err).__name__}: {err}", None))
