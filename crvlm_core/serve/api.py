"""The HTTP side of ``crvlm serve`` (FastAPI): ``POST /v1/chat/completions`` (JSON or SSE chunks),
``GET /v1/models``, ``GET /health``, and OpenAI-style JSON for every error. Only ``application/json`` bodies are
read (415 otherwise); a client that disconnects has its job cancelled (out of the queue, or stopped at the next
token)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from crvlm_core.serve.batcher import ModelServer
from crvlm_core.serve.limits import RequestError
from crvlm_core.serve.schema import parse_request
from crvlm_core.serve.streaming import Job

__all__ = ["check_content_type", "create_app", "error_response", "read_body"]


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


def error_response(err: RequestError):
    headers = {"Retry-After": "1"} if err.code == "server_busy" else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def check_content_type(request) -> None:
    """Only ``application/json`` bodies (any parameters, e.g. ``; charset=utf-8``): a browser page may POST
    ``text/plain`` or a form to a server on localhost without asking first, but not JSON (a CSRF guard)."""
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"Content-Type {media[:80]!r}" if media else "no Content-Type"
        raise RequestError(415, f"send the request body as Content-Type: application/json (got {got})",
                           "unsupported_media_type")


async def _until_disconnected(request) -> None:
    """Returns when the client has gone (the body is read by then, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


async def read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit}", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
    return bytes(body)


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
            check_content_type(request)
            req = parse_request(await read_body(request, server.limits.max_body_bytes))
            job = server.make_job(req, asyncio.get_running_loop())
            server.submit(job)
        except RequestError as err:
            return error_response(err)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": cid, "created": created, "model": job.model, "system_fingerprint": "crvlm"}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventSourceResponse(_stream_events(job, base, include_usage, server.cancel), ping=15, sep="\n")
        watcher = asyncio.create_task(_until_disconnected(request))

        def _gone(task: asyncio.Task) -> None:  # the client left (or its connection broke): stop waiting for it
            if not task.cancelled():
                task.exception()
                job.sink.put_nowait(("gone", None, None))

        watcher.add_done_callback(_gone)
        try:
            return await _answer(job, base)
        finally:
            watcher.cancel()
            server.cancel(job)  # a client that left: its job leaves the queue or stops at the next token

    return app


async def _answer(job: Job, base: dict):
    """The non-streaming answer: the job's events gathered into one ``chat.completion`` (a 500 if it failed)."""
    from starlette.responses import Response

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
        elif kind == "gone":  # the client disconnected: nobody reads this
            return Response(status_code=499)
        else:
            finish, usage = a, b
            break
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(content)},
              "logprobs": {"content": entries} if job.logprobs else None, "finish_reason": finish}
    return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}


async def _stream_events(job: Job, base: dict, include_usage: bool, cancel):
    """SSE ``data:`` chunks in the OpenAI ``chat.completion.chunk`` format, then ``[DONE]``; ``cancel(job)`` when
    the stream ends (a no-op for a finished job), so a client that left frees the worker."""

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
        cancel(job)  # a client that left early: the job leaves the queue or stops at the next token
