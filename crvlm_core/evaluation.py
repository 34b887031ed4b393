"""Evaluate a (steered) model on scoped test data — generate, judge, R / ORR / MB — and sweep a steering vector over
layers × strengths, by judged generation or by refusal scores alone; results cached in the one cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from crvlm_core.core.cache import cached_json
from crvlm_core.core.io import sha256_hex
from crvlm_core.data.schema import Sample
from crvlm_core.judges.registry import judge_responses
from crvlm_core.metrics import rates_by, scope_metrics
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector, intervention_fingerprint
from crvlm_core.steer.score import refusal_score
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["EvalResult", "evaluate", "refusal_score_grid", "score_sweep", "sweep"]


@dataclass
class EvalResult:
    """Metrics and per-sample rows of one evaluation."""

    metrics: dict
    rows: list[dict]


def _mean(values: Sequence[float]) -> float | None:
    """The mean; ``None`` (JSON null: not measured) for no values."""
    return sum(values) / len(values) if values else None


def _run_evaluation(handle: ModelHandle, test: list[Sample], interventions: Sequence[Intervention],
                    max_new_tokens: int, batch_size: int, judge: str, system: str | None,
                    use_images: bool, progress: bool) -> EvalResult:
    images = [s.load_image() if (use_images and handle.is_vlm) else None for s in test]
    start = time.perf_counter()
    responses = steered_generate(handle, [s.prompt for s in test], interventions, images=images, system=system,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    gen_seconds = time.perf_counter() - start
    scores = refusal_score(handle, [s.prompt for s in test], interventions, images=images, system=system,
                           batch_size=batch_size)
    refused = judge_responses(responses, judge, prompts=[s.prompt for s in test])
    rows = [{"id": s.id, "prompt": s.prompt, "subject": s.subject, "scope": s.scope, "response": r, "refused": bool(f),
             "refusal_score": float(sc)} for s, r, f, sc in zip(test, responses, refused, scores)]
    metrics = scope_metrics(refused, [s.scope for s in test])
    n_tokens = sum(len(handle.tokenizer.encode(r, add_special_tokens=False)) for r in responses)
    metrics.update({
        "judge": judge,
        "refusal_rate_by_subject": rates_by(refused, [s.subject for s in test]),
        "mean_refusal_score_out": _mean([float(sc) for s, sc in zip(test, scores) if s.scope == "out"]),
        "mean_refusal_score_in": _mean([float(sc) for s, sc in zip(test, scores) if s.scope == "in"]),
        "generation_seconds": gen_seconds,
        "tokens_per_second": n_tokens / gen_seconds if gen_seconds > 0 else None,  # None: not measured
        "max_new_tokens": max_new_tokens,
        "model": handle.spec,
    })
    return EvalResult(metrics, rows)


def evaluate(handle: ModelHandle, test: Sequence[Sample], interventions: Sequence[Intervention] = (),
             max_new_tokens: int = 24, batch_size: int = 8, judge: str = "keyword", system: str | None = None,
             use_images: bool = True, progress: bool = True,
             cache_dir: str | Path | bool | None = None) -> EvalResult:
    """Generate (steered) answers for scoped test samples, judge refusals, and compute R / ORR / MB.

    Rows carry ``id, prompt, subject, scope, response, refused, refusal_score`` (so ``crvlm judge --input
    samples.jsonl`` can re-judge them); metrics add per-subject refusal rates,
    tokens/s and the judge's name.

    ``cache_dir`` (``crvlm_core.core.cache`` convention; default off): the result is the cache entry ``eval`` under a
    key made of the model, the samples (ids, prompts, images), the interventions' fingerprint
    (:func:`~crvlm_core.steer.interventions.intervention_fingerprint`) and every setting, and an unchanged call
    returns the saved result without running the model (timings are the first run's). A model whose weights differ
    from its spec's (e.g. a merged adapter) must carry a distinct ``key``.
    """
    test = list(test)
    if not test:
        raise ValueError("evaluate: no test samples (empty split)")
    key = {"model": handle.key, "samples": [[s.id, s.prompt, s.scope, s.subject, str(s.image)] for s in test],
           "interventions": intervention_fingerprint(list(interventions)), "max_new_tokens": max_new_tokens,
           "batch_size": batch_size, "judge": judge, "system": system, "use_images": use_images}
    return cached_json(cache_dir, "eval", key,
                       lambda: _run_evaluation(handle, test, interventions, max_new_tokens, batch_size, judge, system,
                                               use_images, progress),
                       encode=lambda r: {"metrics": r.metrics, "rows": r.rows},
                       decode=lambda v: EvalResult(v["metrics"], _with_prompts(v["rows"], test)))


def _with_prompts(rows: list[dict], test: list[Sample]) -> list[dict]:
    """Rows cached before they carried ``prompt`` get it back from their samples (same order), so samples.jsonl
    can always be re-judged with ``crvlm judge --input``."""
    return [r if "prompt" in r else {"id": r["id"], "prompt": s.prompt, **r} for r, s in zip(rows, test)]


def sweep(handle: ModelHandle, vector: SteeringVector, test: Sequence[Sample], layers: Sequence[int],
          alphas: Sequence[float], max_new_tokens: int = 16, batch_size: int = 8,
          progress: Callable[[dict], None] | None = None, judge: str = "keyword",
          cache_dir: str | Path | bool | None = None) -> list[dict]:
    """Layer × strength grid of judged generation: one :func:`evaluate` per cell (cached there with ``cache_dir``).

    Returns one row per (layer, alpha) with ``layer, alpha, refusal_score_in/out, refusal_rate_out,
    over_refusal_in, mb_score`` and an example answer of each scope; ``progress(row)`` is called after each cell.
    :func:`score_sweep` is the same grid by refusal scores alone (no generation).
    """
    rows, test = [], list(test)
    for layer, alpha in [(l, a) for l in layers for a in alphas]:
        iv = [AddVector(vector.directions, (handle.check_layer(layer),), alpha)]
        res = evaluate(handle, test, iv, max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge,
                       progress=False, cache_dir=cache_dir)
        row = {"layer": layer, "alpha": alpha, "refusal_score_out": res.metrics["mean_refusal_score_out"],
               "refusal_score_in": res.metrics["mean_refusal_score_in"],
               **{k: res.metrics[k] for k in ("refusal_rate_out", "over_refusal_in", "mb_score")}}
        row["example_out"] = next((r["response"] for r in res.rows if r["scope"] == "out"), "")
        row["example_in"] = next((r["response"] for r in res.rows if r["scope"] == "in"), "")
        rows.append(row)
        if progress:
            progress(row)
    return rows


def score_sweep(handle: ModelHandle, vector: SteeringVector, test: Sequence[Sample], layers: Sequence[int],
                alphas: Sequence[float], batch_size: int = 8,
                cache_dir: str | Path | bool | None = None) -> list[dict]:
    """Layer × strength grid of mean refusal scores (one forward per cell, no generation): one row per (layer,
    alpha) with ``layer, alpha, refusal_score_in/out``, the means of one :func:`refusal_score_grid` (cached there)."""
    scores: dict[tuple[int, float], list[dict]] = {}
    for r in refusal_score_grid(handle, vector, list(test), layers, alphas, batch_size=batch_size,
                                cache_dir=cache_dir, progress=False):
        scores.setdefault((r["layer"], r["alpha"]), []).append(r)
    rows = []
    for layer, alpha in [(l, a) for l in layers for a in alphas]:
        cell = scores[(handle.check_layer(layer), float(alpha))]
        rows.append({"layer": layer, "alpha": alpha,
                     "refusal_score_out": _mean([r["score"] for r in cell if r["scope"] == "out"]),
                     "refusal_score_in": _mean([r["score"] for r in cell if r["scope"] == "in"])})
    return rows


def _score_cells(handle: ModelHandle, vector: SteeringVector, samples: list[Sample], cells: list[tuple[int, float]],
                 batch_size: int, progress: bool) -> list[dict]:
    prompts = [s.prompt for s in samples]
    unsteered = None
    rows = []
    for layer, alpha in tqdm(cells, desc="refusal-score grid", disable=not progress):
        if alpha == 0.0:
            if unsteered is None:
                unsteered = refusal_score(handle, prompts, [], batch_size=batch_size)
            scores = unsteered
        else:
            scores = refusal_score(handle, prompts, [AddVector(vector.directions, (layer,), alpha)],
                                   batch_size=batch_size)
        rows += [{"layer": layer, "alpha": alpha, "id": s.id, "scope": s.scope, "subject": s.subject,
                  "score": float(x)} for s, x in zip(samples, scores)]
    return rows


def refusal_score_grid(handle: ModelHandle, vector: SteeringVector, samples: Sequence[Sample], layers: Sequence[int],
                       alphas: Sequence[float], batch_size: int = 8, cache_dir: str | Path | bool | None = None,
                       progress: bool = True) -> list[dict]:
    """Per-prompt refusal scores with ``vector`` added at each single layer × strength (one forward per cell, no
    generation), for plots and widgets that must not run the model in their callbacks.

    Returns rows ``{layer, alpha, id, scope, subject, score}``; ``alpha = 0`` rows are the unsteered model (one
    forward, shared by every layer). With ``cache_dir`` (default off), the grid is the cache entry ``score-grid``
    under a key of its inputs and reused.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("refusal_score_grid: no samples (empty split)")
    layers = [handle.check_layer(int(l)) for l in layers]
    key = {"model": handle.key, "vector": vector.fingerprint, "layers": layers, "alphas": [float(a) for a in alphas],
           "batch_size": batch_size, "samples": [[s.id, s.prompt] for s in samples],
           "directions": sha256_hex(vector.directions.float().numpy().tobytes())}
    cells = [(l, float(a)) for l in layers for a in alphas]
    return cached_json(cache_dir, "score-grid", key,
                       lambda: _score_cells(handle, vector, samples, cells, batch_size, progress))
