"""Greedy generation with interventions applied at every step (the prompt pass and each new token), batched with
left padding, prompts of similar length together; through forward hooks (default) or an nnsight trace."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from crvlm_core.extract import prompt_batches
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.apply import apply_in_trace, hooked, interventions_of, prepared, validated
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.prefill import continuation_inputs, shared_gates, shared_prompt_pass

__all__ = ["GENERATE_BACKEND", "GENERATE_BACKENDS", "generate_batch", "steered_generate"]

#: Default of ``steered_generate(backend=...)``.
GENERATE_BACKEND = "hooks"
GENERATE_BACKENDS = ("hooks", "nnsight")


@torch.no_grad()
def steered_generate(handle: ModelHandle, prompts: Sequence[str], interventions: Sequence[Intervention] = (),
                     images: Sequence | None = None, system: str | None = None, max_new_tokens: int = 32,
                     batch_size: int = 8, progress: bool = False, return_ids: bool = False,
                     backend: str | None = None) -> list[str]:
    """Greedy generation with the interventions applied at every step (the prompt pass and each new token).

    Prompts are batched ``batch_size`` at a time, prompts of similar length together, with left padding. With no
    interventions this is the plain model.
    ``backend``: ``"hooks"`` (plain PyTorch forward hooks around ``generate``, the default: no per-module tracing
    cost) or ``"nnsight"`` (``tracer.all()``); both give the same tokens (tests/test_benchmarks.py).
    """
    prompts = list(prompts)
    if not prompts:
        return []
    table = validated(handle, interventions)
    images = list(images) if images is not None else [None] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    batches = prompt_batches(handle, prompts, [im is not None for im in images], batch_size)
    for has_img, idx in tqdm(batches, desc="generate", disable=not progress, unit="batch"):
        imgs = [images[k] for k in idx] if has_img else None
        enc = handle.build_inputs([prompts[k] for k in idx], imgs, system)
        ids = generate_batch(handle, enc, table, max_new_tokens, backend=backend)
        for k, text in zip(idx, handle.decode_new(ids, enc["input_ids"].shape[1])):
            texts[k] = text
    return texts


def generate_batch(handle: ModelHandle, enc: dict, table: dict, max_new_tokens: int, backend: str | None = None,
                   on_logits: Callable[[torch.Tensor], None] | None = None, **gen_kwargs) -> torch.Tensor:
    """Greedy generation of one batch (``table`` from :func:`crvlm_core.steer.apply.validated`), its interventions
    prepared and released around it; ``on_logits(logits[batch, vocab])`` gets each step's raw next-token logits
    (steered); ``gen_kwargs`` (e.g. a streamer) go to ``generate``. Returns the prompt and new token ids on CPU.

    With the hook backend, prefill gates with ``gate_pass="shared"`` are read in the one unsteered prompt pass whose
    cache the steered generation continues from (:mod:`crvlm_core.steer.prefill`); the nnsight backend reads them in
    a pass of their own and steers the same positions. A handle with :attr:`~ModelHandle.remote` set always takes
    the nnsight backend (forward hooks cannot be shipped to a server)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=handle.tokenizer.pad_token_id,
                  **gen_kwargs)
    backend = backend or GENERATE_BACKEND
    if backend not in GENERATE_BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose from {GENERATE_BACKENDS}")
    ivs = interventions_of(table)
    if handle.remote or (backend == "nnsight" and ivs):  # hooks cannot travel: a remote run is one nnsight trace
        if on_logits is not None:
            raise ValueError("on_logits needs the hook backend (not available with remote traces)")
        return _generate_nnsight(handle, enc, table, ivs, kwargs)
    shared = shared_gates(ivs)
    with prepared(handle, ivs, enc, skip=shared):
        cache = shared_prompt_pass(handle, enc, shared) if shared else None
        inputs = enc if cache is None else {**continuation_inputs(handle, enc), "cache": cache}
        with hooked(handle, table), logits_watched(handle, on_logits):
            return handle.hf_model.generate(**inputs, **kwargs).cpu()


@contextmanager
def logits_watched(handle: ModelHandle, on_logits: Callable[[torch.Tensor], None] | None):
    """``on_logits(logits[batch, vocab])`` with the last position's output-layer logits of every forward inside
    the block (nothing when ``on_logits`` is None)."""
    if on_logits is None:
        yield
        return
    head = handle.hf_model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _m, _i, out: on_logits(out[:, -1].detach()))
    try:
        yield
    finally:
        hook.remove()


def _generate_nnsight(handle: ModelHandle, enc: dict, table: dict, ivs: list, kwargs: dict) -> torch.Tensor:
    with prepared(handle, ivs, enc), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with handle.model.generate(**kwargs, **handle.trace_options()) as tracer:
            with tracer.invoke(enc):
                if table:
                    for _ in tracer.all():
                        apply_in_trace(handle, table)
            with tracer.invoke():
                ids = tracer.result.detach().cpu().save()  # what leaves a (remote) trace is on the CPU
    return ids.detach().cpu()
