"""``crvlm serve``: an OpenAI-compatible HTTP server (chat completions, SSE streaming, token logprobs) in front of a
model, unsteered and steered by a ``crvlm fit`` artifact or a fitted policy. One worker thread owns the model and
runs concurrent requests as left-padded micro-batches; FastAPI + uvicorn handle HTTP.

Model names: ``<spec>`` is the plain model and ``<spec>:steered`` the steered one (only when an artifact or a
policy is given). Decoding is greedy: ``temperature``, ``top_p`` and ``seed`` are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers.generation.streamers import BaseStreamer

from crvlm_core.models.loading import ModelHandle
from crvlm_core.steer.interventions import Intervention

__all__ = ["ServeLimits", "ModelServer", "RequestError", "create_app", "generate_streaming", "load_variants",
           "run_server", "running", "STEERED_SUFFIX"]

STEERED_SUFFIX = ":steered"


def _import_anyio_backend() -> None:
    """Import anyio's asyncio backend (which sse-starlette loads lazily at the first stream) now, with nnsight's
    process-wide ``object.save`` lifted meanwhile: anyio's typed-attribute classes reject any attribute they do
    not declare, and would fail with "Attribute 'save' is missing its type annotation"."""
    import sys

    if "anyio._backends._asyncio" in sys.modules:
        return
    mounted = object.__dict__.get("save")
    unmount = mount = None
    if mounted is not None:
        from nnsight._c import mount, unmount
    if unmount is not None:
        unmount("save")
    try:
        import anyio._backends._asyncio  # noqa: F401
    finally:
        if mount is not None:
            mount(mounted, "save")


_import_anyio_backend()


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
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {getattr(self, name)}")
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


# ------------------------------------------------------------------------------------------------------------------
# Request schema (OpenAI chat completions; unknown fields are accepted and ignored)
# ------------------------------------------------------------------------------------------------------------------


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


def _text_of(content: str | list[_Part], where: str) -> str:
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
    system = "\n".join(_text_of(m.content, f"messages.{i}.content") for i, m in enumerate(messages)
                       if m.role in ("system", "developer"))
    turns = [(i, m) for i, m in enumerate(messages) if m.role not in ("system", "developer")]
    if not turns or turns[-1][1].role != "user":
        raise RequestError(400, "the last non-system message must have role `user`", "invalid_messages", "messages")
    if len(turns) == 1:
        i, m = turns[0]
        return handle.format_prompt(_text_of(m.content, f"messages.{i}.content"), system or None)
    if handle.is_vlm:
        raise RequestError(400, f"{handle.spec}: multi-turn conversations are served for text-only models only",
                           "unsupported_conversation", "messages")
    chat = ([{"role": "system", "content": system}] if system else []) + [
        {"role": m.role, "content": _text_of(m.content, f"messages.{i}.content")} for i, m in turns]
    return handle.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------------------------
# Generation with per-token callbacks (streaming, logprobs, per-row stops)
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_streaming(handle: ModelHandle, enc: dict, interventions: Sequence[Intervention], max_new_tokens: int,
                       streamer: BaseStreamer | None = None, on_logits=None, stopping_criteria=None) -> torch.Tensor:
    """Greedy generation of one left-padded batch with the interventions on every token — the decoding of
    :func:`crvlm_core.steer.interventions.steered_generate` — plus hooks a server needs: ``streamer.put(ids[batch])`` after each
    step, ``on_logits(logits[batch, vocab])`` with each step's raw next-token logits (steered), and
    ``stopping_criteria`` (a transformers ``StoppingCriteria`` or list) to end rows early.

    Returns the generated ids ``[batch, prompt + new]`` on CPU.
    """
    from transformers import StoppingCriteriaList

    from crvlm_core.steer.interventions import _generate_batch, _prepared, _validated

    table = _validated(handle, interventions)
    kwargs: dict[str, Any] = {}
    if streamer is not None:
        kwargs["streamer"] = streamer
    if stopping_criteria is not None:
        crit = stopping_criteria if isinstance(stopping_criteria, (list, tuple)) else [stopping_criteria]
        kwargs["stopping_criteria"] = StoppingCriteriaList(list(crit))
    with _prepared(handle, interventions, enc):  # prefill gating runs its own prompt pass here, before the hook
        hook = None
        if on_logits is not None:
            head = handle.hf_model.get_output_embeddings()
            hook = head.register_forward_hook(lambda _m, _i, out: on_logits(out[:, -1].detach()))
        try:
            return _generate_batch(handle, enc, table, max_new_tokens, **kwargs)
        finally:
            if hook is not None:
                hook.remove()


@dataclass
class _Job:
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


class _BatchStream(BaseStreamer):
    """Turns each decoding step of a batch into per-request events: text deltas (decoded incrementally, held back
    while they could be the start of a stop string), logprobs, and the finish reason. Doubles as the stopping
    criterion that ends a row at its own ``max_tokens``, a stop string or EOS."""

    def __init__(self, server: "ModelServer", jobs: list[_Job]):
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
                job.done = True
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
                delta, cut = _stop_aware_delta(text, job.sent, job.stop)
            job.sent += delta
            job.emit(("token", delta, entry))
            if cut is not None:
                self._finish(job, "stop")
            elif len(job.ids) >= job.max_tokens:
                self._flush(job)
                self._finish(job, "length")

    def _flush(self, job: _Job) -> None:
        """Send text held back for a stop string that never came."""
        rest = self.server.decode(job.ids)[len(job.sent):]
        if rest and not rest.endswith("\ufffd"):
            job.sent += rest
            job.emit(("token", rest, None))

    def _finish(self, job: _Job, reason: str) -> None:
        job.done = True
        job.emit(("done", reason, {"prompt_tokens": job.n_prompt_tokens, "completion_tokens": len(job.ids),
                                   "total_tokens": job.n_prompt_tokens + len(job.ids)}))

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self._flush(job)
                self._finish(job, "length")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """StoppingCriteria: rows whose request is finished (or cancelled) are done."""
        return torch.tensor([j.done or j.cancelled for j in self.jobs], dtype=torch.bool, device=input_ids.device)


def _stop_aware_delta(text: str, sent: str, stops: list[str]) -> tuple[str, int | None]:
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


# ------------------------------------------------------------------------------------------------------------------
# The model server: one worker thread, micro-batches
# ------------------------------------------------------------------------------------------------------------------


class ModelServer:
    """Owns the model and a worker thread; requests are queued as jobs and generated in micro-batches.

    Args:
        handle: the loaded model.
        variants: served model name → interventions (``[]`` = unsteered), e.g. from :func:`load_variants`.
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
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=self.limits.max_queue)
        self._stop = threading.Event()
        self._tok_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self._thread: threading.Thread | None = None
        self.stats = {"requests": 0, "batches": 0, "batched_requests": 0, "max_batch": 0, "errors": 0}
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
    def make_job(self, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> _Job:
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
        chars = sum(len(_text_of(m.content, "messages")) for m in req.messages)
        if chars > lim.max_prompt_chars:
            raise RequestError(400, f"the messages have {chars} characters; this server accepts at most "
                               f"{lim.max_prompt_chars}", "context_length_exceeded", "messages")
        text = format_messages(self.handle, req.messages)
        n_tok = self.count_tokens(text)
        if n_tok > lim.max_prompt_tokens:
            raise RequestError(400, f"the prompt has {n_tok} tokens; this server accepts at most "
                               f"{lim.max_prompt_tokens}", "context_length_exceeded", "messages")
        return _Job(req.model, text, n_tok, max_tokens, stop, bool(req.logprobs or top), top, loop, asyncio.Queue())

    def submit(self, job: _Job) -> None:
        if not self.alive:
            raise RequestError(503, "the model worker is not running", "server_unavailable", type_="server_error")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise RequestError(503, f"server busy: {self.limits.max_queue} requests already queued; retry later",
                               "server_busy", type_="server_error") from None
        self.stats["requests"] += 1

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
            groups: dict[str, list[_Job]] = {}
            for job in batch:
                groups.setdefault(job.model, []).append(job)
            for jobs in groups.values():
                self._generate([j for j in jobs if not j.cancelled])

    def _generate(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        self.stats["batches"] += 1
        self.stats["batched_requests"] += len(jobs)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(jobs))
        stream = _BatchStream(self, jobs)
        try:
            enc = self.encode([j.text for j in jobs])
            generate_streaming(self.handle, enc, self.variants[jobs[0].model], max(j.max_tokens for j in jobs),
                               streamer=stream, on_logits=stream.on_logits, stopping_criteria=stream)
            stream.end()
        except Exception as err:  # one failed batch answers its requests with 500s; the worker goes on
            self.stats["errors"] += 1
            for job in jobs:
                if not job.done:
                    job.done = True
                    job.emit(("error", f"{type(err).__name__}: {err}", None))


# ------------------------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------------------------


def _error_response(err: RequestError):
    headers = {"Retry-After": "1"} if err.code == "server_busy" else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit}", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
    return bytes(body)


def _parse_request(body: bytes) -> ChatRequest:
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


def create_app(server: ModelServer):
    """The FastAPI app: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. Starts the worker."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="crvlm serve", version="1", docs_url=None, redoc_url=None)
    server.start()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown paths, wrong methods: OpenAI-style JSON too
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": code}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                       "param": None, "code": "internal_error"}}, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok" if server.alive else "worker_down", "models": sorted(server.variants),
                "queued": server._queue.qsize(), **server.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.created,
                                            "owned_by": "crvlm", "steered": bool(ivs)}
                                           for name, ivs in server.variants.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = _parse_request(await _read_body(request, server.limits.max_body_bytes))
            job = server.make_job(req, asyncio.get_running_loop())
            server.submit(job)
        except RequestError as err:
            return _error_response(err)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": job.model, "system_fingerprint": "crvlm"}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_stream_events(job, base, include_usage), ping=15, sep="\n")
        content, entries = [], []
        while True:
            kind, a, b = await job.sink.get()
            if kind == "token":
                content.append(a)
                if b is not None:
                    entries.append(b)
            elif kind == "error":
                return JSONResponse({"error": {"message": a, "type": "server_error", "param": None,
                                               "code": "generation_failed"}}, status_code=500)
            else:
                finish, usage = a, b
                break
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(content)},
                  "logprobs": {"content": entries} if job.logprobs else None, "finish_reason": finish}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    return app


async def _stream_events(job: _Job, base: dict, include_usage: bool):
    """SSE ``data:`` chunks in the OpenAI ``chat.completion.chunk`` format, then ``[DONE]``."""

    def chunk(delta: dict, logprobs=None, finish=None) -> dict:
        return {"data": json.dumps({**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})}

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, a, b = await job.sink.get()
            if kind == "token":
                if a or b is not None:
                    yield chunk({"content": a}, {"content": [b]} if b is not None else None)
            elif kind == "error":
                yield {"data": json.dumps({"error": {"message": a, "type": "server_error", "param": None,
                                                     "code": "generation_failed"}})}
                break
            else:
                yield chunk({}, None, a)
                if include_usage:
                    yield {"data": json.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": b})}
                break
        yield {"data": "[DONE]"}
    finally:
        job.cancelled = True  # a client that left early frees its batch row


# ------------------------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------------------------


def load_variants(handle: ModelHandle, artifact: str | Path | None = None) -> dict[str, list[Intervention]]:
    """Served names: ``<spec>`` → unsteered and, with a ``crvlm fit`` artifact (a vector, a CR-VLM calibrator or a
    fitted policy), ``<spec>:steered`` → its interventions."""
    variants: dict[str, list[Intervention]] = {handle.spec: []}
    if artifact is not None:
        from crvlm_core.cli.main import load_interventions

        variants[handle.spec + STEERED_SUFFIX] = load_interventions(Path(artifact), handle)
    return variants


@contextmanager
def running(model_server: ModelServer, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning",
            start_timeout: float = 60.0) -> Iterator[str]:
    """Run the HTTP app in a background thread (tests, benchmarks, notebooks); yields its base URL and stops the
    server and the model worker on exit. ``port=None`` picks a free port."""
    import socket

    import uvicorn

    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model_server), host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, name="crvlm-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        model_server.stop()


def run_server(model: str | None = None, artifact: str | Path | None = None, policy: str | Path | None = None,
               host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits | None = None,
               log_level: str = "info") -> None:
    """Load the model (the artifact's, unless ``model`` is given), build the served variants and run uvicorn until
    interrupted. ``policy`` is a policy YAML whose fitted artifact folder it names (see :mod:`crvlm_core.methods.policies.policies`)."""
    import uvicorn

    from crvlm_core.models.loading import DEFAULT_MODEL, load_model

    if policy is not None:
        if artifact is not None:
            raise ValueError("give --artifact or --policy, not both")
        from crvlm_core.methods.policies.policies import fitted_artifact

        artifact = fitted_artifact(policy)
    if artifact is not None:
        fit_json = Path(artifact) / "fit.json"
        if not fit_json.exists():
            raise FileNotFoundError(f"{artifact} has no fit.json: not a `crvlm fit` output folder")
        model = model or json.loads(fit_json.read_text()).get("model")
    handle = load_model(model or DEFAULT_MODEL)
    server = ModelServer(handle, load_variants(handle, artifact), limits)
    print(f"[serve] {handle.spec}: models {sorted(server.variants)} on http://{host}:{port}/v1", flush=True)
    try:
        uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
    finally:
        server.stop()
