"""``crvlm serve --engine vllm``: the same OpenAI-style names (``<spec>``, ``<spec>:steered``) served by vLLM through
nnsight's vLLM integration. The steering is installed once on the engine with ``model.edit(name="steered")``, so it
runs inside vLLM's own batching for every request that asks for it; unsteered requests pass ``edits=[]``.

vLLM's decoder layers return ``(hidden, residual)`` whose sum is the residual stream the library's interventions are
written for (transformers' layers return the sum): :func:`stream_update` applies an intervention to the sum and hands
the change back on ``hidden``. Activations arrive flat, ``[tokens, d]`` per request.

Served: vectors (add, project out), CR-VLM calibrators gated on the steered layer's own state (``--gate-layer none``)
and anything else that decides per token. Prefill gates (CR-VLM's default late-layer gate, CAST, policies) need the
prompt read up to a late layer before the first steered token; that second pass is not built for vLLM yet, so they
are refused with one line. Needs ``pip install vllm`` on Linux with a CUDA GPU; neither is on the CPU machines this
project is developed on, so only the checks, the stream arithmetic and the HTTP layer are tested here
(docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
import uuid
from typing import Awaitable, Callable, Sequence

import torch
from fastapi import Request  # at module level: FastAPI resolves the handler's annotation here

from crvlm_core.core.errors import InputError
from crvlm_core.models.handle import ModelHandle, resolve_path
from crvlm_core.serve.limits import RequestError, ServeLimits
from crvlm_core.serve.schema import format_messages, parse_request
from crvlm_core.steer.apply import by_layer
from crvlm_core.steer.base import Intervention, PrefillGate

__all__ = ["EDIT_NAME", "VLLM_NEEDS", "check_engine_interventions", "check_vllm", "create_vllm_app",
           "handle_generate", "install_steering", "run_vllm_server", "stream_update", "vllm_generate"]

EDIT_NAME = "steered"
VLLM_NEEDS = "crvlm serve --engine vllm needs the vllm package (pip install vllm; Linux) and a CUDA GPU"

#: ``generate(prompts, max_tokens, steered) -> texts``: what the HTTP layer asks of an engine.
Generate = Callable[[list[str], int, bool], Awaitable[list[str]]]


def check_vllm() -> None:
    """One line (InputError) when vLLM or a CUDA GPU is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise InputError(f"{VLLM_NEEDS}: vllm is not installed in {sys.prefix}")
    if not torch.cuda.is_available():
        raise InputError(f"{VLLM_NEEDS}: torch {torch.__version__} sees no CUDA GPU here")


def check_engine_interventions(interventions: Sequence[Intervention]) -> None:
    """Refuse what the vLLM engine cannot steer yet: prefill gates (they read the prompt in a pass of their own)."""
    for iv in interventions:
        if isinstance(iv, PrefillGate) and iv.gate_layer is not None and getattr(iv, "fixed_gate", None) is None:
            raise InputError(f"--engine vllm: {type(iv).__name__} reads a prefill gate at layer {iv.gate_layer}, "
                             "which the vLLM engine does not run yet; serve it with the default engine, or fit a "
                             "CR-VLM calibrator with --gate-layer none (gated per token)")


def stream_update(iv: Intervention, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """vLLM's ``hidden`` after ``iv`` acts on the residual stream ``hidden + residual`` (``[tokens, d]``)."""
    stream = hidden if residual is None else hidden + residual
    return hidden + (iv.apply(layer, stream.unsqueeze(0)).squeeze(0) - stream)


def install_steering(model, interventions: Sequence[Intervention], layers_path: str = "model.layers"):
    """Install ``interventions`` on nnsight's ``VLLM`` engine ``model`` for every request that names
    :data:`EDIT_NAME`, on every token (prompt and generated). Returns nnsight's edit handle (``.clear()``)."""
    from crvlm_core.models.remote import register_library

    check_engine_interventions(interventions)
    register_library()  # the edit is shipped to vLLM's worker processes: the library's code goes by value
    table = by_layer(interventions)
    layers = resolve_path(model, layers_path)
    with model.edit(name=EDIT_NAME) as (tracer, edit):
        for _ in tracer.all():
            for layer, group in table.items():
                out = layers[layer].output
                hidden, residual = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
                for iv in group:
                    hidden = stream_update(iv, layer, hidden, residual)
                layers[layer].output = (hidden, residual) if isinstance(out, tuple) else hidden
    return edit


def vllm_generate(model) -> Generate:
    """The engine call of an async ``VLLM``: greedy, ``edits=[EDIT_NAME]`` when steered, ``[]`` when not."""

    async def generate(prompts: list[str], max_tokens: int, steered: bool) -> list[str]:
        outputs = await model.generate(prompts, max_tokens=max_tokens, temperature=0.0,
                                       edits=[EDIT_NAME] if steered else [])
        return [o.outputs[0].text for o in outputs]

    return generate


def create_vllm_app(handle: ModelHandle, variants: dict[str, list[Intervention]], generate: Generate,
                    limits: ServeLimits | None = None):
    """A small OpenAI-style app over an engine call: ``GET /health``, ``GET /v1/models``, non-streaming
    ``POST /v1/chat/completions`` (greedy). ``handle`` formats the chat with its tokenizer."""
    from fastapi import FastAPI

    from crvlm_core.serve.api import check_content_type, error_response, read_body

    limits = limits or ServeLimits()
    app = FastAPI(title="crvlm serve (vllm)", version="1", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": "vllm", "models": sorted(variants)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "crvlm",
                                            "steered": bool(ivs)} for name, ivs in variants.items()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_content_type(request)
            req = parse_request(await read_body(request, limits.max_body_bytes))
            prompt, max_tokens = _checked(req, handle, variants, limits)
        except RequestError as err:
            return error_response(err)
        text = (await generate([prompt], max_tokens, bool(variants[req.model])))[0]
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": "crvlm-vllm",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                             "logprobs": None}]}

    return app


def _checked(req, handle: ModelHandle, variants: dict, limits: ServeLimits) -> tuple[str, int]:
    """The request's chat-formatted prompt and token budget, or a RequestError."""
    if req.model not in variants:
        raise RequestError(404, f"the model `{req.model}` does not exist here; served: {sorted(variants)}",
                           "model_not_found", "model")
    for field, unsupported in (("stream", req.stream), ("logprobs", req.logprobs), ("n", req.n != 1)):
        if unsupported:
            raise RequestError(400, f"`{field}` is not supported by crvlm serve's vllm engine yet (the default "
                               "engine has it)", "unsupported_field", field)
    max_tokens = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise RequestError(400, f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}",
                           "max_tokens_too_large", "max_tokens")
    return format_messages(handle, req.messages), max_tokens


def handle_generate(handle: ModelHandle, variants: dict[str, list[Intervention]]) -> Generate:
    """The engine call on a handle loaded with transformers: the HTTP layer's partner on a machine without vLLM
    (tests), greedy like :func:`vllm_generate`, steered with the served ``:steered`` interventions."""
    from crvlm_core.steer.apply import validated
    from crvlm_core.steer.generate import generate_batch

    steered_ivs = next((ivs for ivs in variants.values() if ivs), [])

    def run(prompts: list[str], max_tokens: int, steered: bool) -> list[str]:
        add = handle._add_special_tokens(prompts[0])
        enc = dict(handle.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add))
        table = validated(handle, steered_ivs if steered else [])
        ids = generate_batch(handle, enc, table, max_tokens)
        return handle.decode_new(ids, enc["input_ids"].shape[1])

    async def generate(prompts: list[str], max_tokens: int, steered: bool) -> list[str]:
        return await asyncio.to_thread(run, prompts, max_tokens, steered)

    return generate


def run_vllm_server(model: str | None, artifact=None, policy=None, host: str = "127.0.0.1", port: int = 8000,
                    limits: ServeLimits | None = None, dtype: str | None = None, log_level: str = "info") -> None:
    """Start nnsight's async ``VLLM`` engine on ``model`` (the artifact's by default; a hub id, a local folder, or an
    embedded spec's converted folder), install the artifact's steering, serve until interrupted."""
    check_vllm()
    import uvicorn
    from nnsight.modeling.vllm import VLLM
    from transformers import AutoConfig

    from crvlm_core.core.artifacts import read_manifest
    from crvlm_core.models.embedded import embedded_model_folder
    from crvlm_core.models.specs import DEFAULT_MODEL, EMBEDDED
    from crvlm_core.serve.variants import load_variants

    if policy is not None:
        from crvlm_core.methods.policies.artifact import fitted_artifact

        artifact = fitted_artifact(policy)
    spec = model or (read_manifest(artifact)["model"]["spec"] if artifact is not None else DEFAULT_MODEL)
    source = str(embedded_model_folder(spec)) if spec in EMBEDDED else spec
    engine = VLLM(source, dispatch=True, mode="async", **({"dtype": dtype} if dtype else {}))
    config = AutoConfig.from_pretrained(source).get_text_config()
    handle = ModelHandle(spec=spec, family="causal", hf_model=engine._model, model=engine, tokenizer=engine.tokenizer,
                         processor=None, layers_path="model.layers", n_layers=int(config.num_hidden_layers),
                         hidden_size=int(config.hidden_size))
    variants = load_variants(handle, artifact)
    steered = [ivs for ivs in variants.values() if ivs]
    if steered:
        install_steering(engine, steered[0])
    print(f"[serve] {spec} on vLLM: models {sorted(variants)} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(create_vllm_app(handle, variants, vllm_generate(engine), limits), host=host, port=port,
                log_level=log_level)
