"""Fit refusal vectors from scoped data (which prompts to read, with which prefixes, and which estimator), evaluate
a steered model on scoped test data, and sweep layers × strengths. The CLI and the notebooks call these."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from crvlm_core.vectors import estimators as V
from crvlm_core.data.samples import Sample
from crvlm_core.extract import Activations, extract
from crvlm_core.core.io import atomic_write_json, cache_path, sha256_hex
from crvlm_core.judges.judges import judge_responses
from crvlm_core.metrics import rates_by, scope_metrics
from crvlm_core.models.loading import ModelHandle
from crvlm_core.steer.interventions import AddVector, Intervention, intervention_fingerprint, refusal_score, steered_generate

__all__ = [
    "METHODS",
    "REFUSAL_PREFIX",
    "COMPLIANT_PREFIX",
    "LITERAL_PREFIX",
    "REFUSAL_SYSTEM_PROMPT",
    "default_layers",
    "fit_vector",
    "evaluate",
    "EvalResult",
    "sweep",
    "refusal_score_grid",
]

#: Teacher-forcing prefixes (measured on Qwen2.5-0.5B, see README): the one-token pair "Sorry" / "Sure", read at
#: the first assistant token, is the same-token contrast that flips the model into refusing; the longer pair
#: "Sorry, I cannot answer" / "Sure, I can answer" (aligned, same last token) mostly encodes "cannot" vs "can" and
#: barely refuses at the same strength. The long pair is what the prefix-mean variant averages over.
REFUSAL_PREFIX = "Sorry"
COMPLIANT_PREFIX = "Sure"
LONG_REFUSAL_PREFIX = "Sorry, I cannot answer"
LONG_COMPLIANT_PREFIX = "Sure, I can answer"
#: The literal CR-VLM form (eq. 1–2): the refusal prefix's last token against the prompt's last token.
LITERAL_PREFIX = REFUSAL_PREFIX
#: System prompt of the prompt-based ("persona") vector.
REFUSAL_SYSTEM_PROMPT = ("You refuse every request. Never answer the question; always reply only: "
                         "'Sorry, I cannot answer that.'")

#: method → one-line description. ``teacher-forced`` is the default (chosen by measured refusal rate: see README).
METHODS: dict[str, str] = {
    "teacher-forced": "same-token contrast: h(x ⊕ 'Sorry') − h(x ⊕ 'Sure') at the prefix token, out-of-scope x",
    "teacher-forced-literal": "CR-VLM eq. 1–2 literally: h(x ⊕ 'Sorry') at its last token − h(x) at the prompt's last token",
    "teacher-forced-prefix-mean": "'Sorry, I cannot answer' minus 'Sure, I can answer', each averaged over its prefix positions",
    "prompt-based": "persona: h(refusal system prompt ⊕ x) − h(x) at the prompt's last token",
    "ridge": "ridge regression of refusal labels (refusal vs compliant teacher-forced prefix) on activations",
    "mean-diff": "h(out-of-scope x) − h(in-scope x) at the prompt's last token (refusal_direction style)",
    "pca": "first principal component of paired (refusal − compliant) teacher-forced differences",
}


def default_layers(handle: ModelHandle) -> list[int]:
    """One layer a third of the way up the stack (layer 8 of Qwen2.5-0.5B's 24, 10 of SmolLM2's 30)."""
    return [handle.n_layers // 3]


def _out_in(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    out = [s for s in samples if s.scope == "out"]
    inn = [s for s in samples if s.scope == "in"]
    if not out:
        raise ValueError("no out-of-scope training samples (empty split): check --in-scope and the data's subjects")
    return out, inn


def fit_vector(handle: ModelHandle, train: Sequence[Sample], method: str = "teacher-forced",
               layers: Sequence[int] | None = None, alpha: float = 1.0, ridge_lambda: float = 1.0,
               refusal_prefix: str | None = None, compliant_prefix: str | None = None,
               batch_size: int = 8, cache: bool = True, progress: bool = True) -> V.SteeringVector:
    """Fit a refusal vector on scoped training samples (``scope`` set on each).

    Args:
        refusal_prefix / compliant_prefix: teacher-forcing prefixes (defaults: "Sorry" / "Sure"; for
            ``teacher-forced-prefix-mean`` the long pair). The two should tokenize to the same length.

    Returns:
        A :class:`~crvlm_core.vectors.estimators.SteeringVector` with directions for every layer, applied at ``layers``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    layers = [handle.check_layer(int(l)) for l in (layers if layers is not None else default_layers(handle))]
    if not layers:
        raise ValueError("no layers to steer")
    out, inn = _out_in(train)
    kw = dict(batch_size=batch_size, cache=cache, progress=progress)

    def ex(samples, **more) -> Activations:
        return extract(handle, samples, **kw, **more)

    positions = "last"
    fingerprints: list[str] = []
    long = method == "teacher-forced-prefix-mean"
    refusal_prefix = refusal_prefix or (LONG_REFUSAL_PREFIX if long else REFUSAL_PREFIX)
    compliant_prefix = compliant_prefix or (LONG_COMPLIANT_PREFIX if long else COMPLIANT_PREFIX)
    if method in ("teacher-forced", "ridge", "pca", "teacher-forced-prefix-mean"):
        pos = "prefix-mean" if long else "last"
        positions = "prefix-mean" if long else "prefix-last"
        ref = ex(out, position=pos, assistant_prefix=refusal_prefix, desc="refusal prefix")
        com = ex(out, position=pos, assistant_prefix=compliant_prefix, desc="compliant prefix")
        fingerprints = [ref.fingerprint, com.fingerprint]
        if method == "ridge":
            acts = torch.cat([ref.acts, com.acts])
            y = torch.cat([torch.ones(len(out)), torch.zeros(len(out))])
            directions = V.ridge_direction(acts, y, ridge_lambda)
        elif method == "pca":
            directions = V.pca_direction(ref.acts, com.acts)
        else:
            directions = V.teacher_forced_mean_diff(ref.acts, com.acts)
    elif method == "teacher-forced-literal":
        positions = "prefix-last vs prompt-last"
        ref = ex(out, assistant_prefix=refusal_prefix, desc="refusal prefix")
        plain = ex(out, desc="prompt")
        fingerprints = [ref.fingerprint, plain.fingerprint]
        directions = V.teacher_forced_mean_diff(ref.acts, plain.acts)
    elif method == "prompt-based":
        sys_acts = ex(out, system=REFUSAL_SYSTEM_PROMPT, desc="with system prompt")
        plain = ex(out, desc="without system prompt")
        fingerprints = [sys_acts.fingerprint, plain.fingerprint]
        directions = V.prompt_based(sys_acts.acts, plain.acts)
    else:  # mean-diff
        if not inn:
            raise ValueError("mean-diff needs in-scope training samples too (empty in-scope split)")
        a_out, a_in = ex(out, desc="out-of-scope"), ex(inn, desc="in-scope")
        fingerprints = [a_out.fingerprint, a_in.fingerprint]
        directions = V.mean_diff(a_out.acts, a_in.acts)
    return V.SteeringVector(
        directions=directions, method=method, layers=layers, operation="add", alpha=alpha, positions=positions,
        model_spec=handle.spec, fingerprint="+".join(fingerprints),
        extra={"n_out": len(out), "n_in": len(inn), "ridge_lambda": ridge_lambda if method == "ridge" else None,
               "refusal_prefix": refusal_prefix, "compliant_prefix": compliant_prefix},
    )


@dataclass
class EvalResult:
    """Metrics and per-sample rows of one evaluation."""

    metrics: dict
    rows: list[dict]


def evaluate(handle: ModelHandle, test: Sequence[Sample], interventions: Sequence[Intervention] = (),
             max_new_tokens: int = 24, batch_size: int = 8, judge: str = "keyword", system: str | None = None,
             use_images: bool = True, progress: bool = True, cache_dir: str | Path | None = None) -> EvalResult:
    """Generate (steered) answers for scoped test samples, judge refusals, and compute R / ORR / MB.

    Rows carry ``id, subject, scope, response, refused, refusal_score``; metrics add per-subject refusal rates,
    tokens/s and the judge's name.

    ``cache_dir``: when given, the result is saved there under a key made of the model spec, the samples (ids,
    prompts, images), the interventions' fingerprint (:func:`~crvlm_core.steer.interventions.intervention_fingerprint`) and every
    setting, and an unchanged call returns the saved result without running the model (timings are the first
    run's). A model whose weights differ from its spec's (e.g. a merged adapter) must carry a distinct ``spec``.
    """
    test = list(test)
    if not test:
        raise ValueError("evaluate: no test samples (empty split)")
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_path(cache_dir, "eval", {
            "model": handle.key, "samples": [[s.id, s.prompt, s.scope, s.subject, str(s.image)] for s in test],
            "interventions": intervention_fingerprint(list(interventions)), "max_new_tokens": max_new_tokens,
            "batch_size": batch_size, "judge": judge, "system": system, "use_images": use_images})
        if cache_file.exists():
            saved = json.loads(cache_file.read_text())
            return EvalResult(saved["metrics"], saved["rows"])
    images = [s.load_image() if (use_images and handle.is_vlm) else None for s in test]
    start = time.perf_counter()
    responses = steered_generate(handle, [s.prompt for s in test], interventions, images=images, system=system,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    gen_seconds = time.perf_counter() - start
    scores = refusal_score(handle, [s.prompt for s in test], interventions, images=images, system=system,
                           batch_size=batch_size)
    refused = judge_responses(responses, judge, prompts=[s.prompt for s in test])
    rows = [{"id": s.id, "subject": s.subject, "scope": s.scope, "response": r, "refused": bool(f),
             "refusal_score": float(sc)} for s, r, f, sc in zip(test, responses, refused, scores)]
    metrics = scope_metrics(refused, [s.scope for s in test])
    n_tokens = sum(len(handle.tokenizer.encode(r, add_special_tokens=False)) for r in responses)
    metrics.update({
        "judge": judge,
        "refusal_rate_by_subject": rates_by(refused, [s.subject for s in test]),
        "mean_refusal_score_out": _mean([float(sc) for s, sc in zip(test, scores) if s.scope == "out"]),
        "mean_refusal_score_in": _mean([float(sc) for s, sc in zip(test, scores) if s.scope == "in"]),
        "generation_seconds": gen_seconds,
        "tokens_per_second": n_tokens / gen_seconds if gen_seconds > 0 else float("nan"),
        "max_new_tokens": max_new_tokens,
        "model": handle.spec,
    })
    if cache_file is not None:
        atomic_write_json(cache_file, {"metrics": metrics, "rows": rows})
    return EvalResult(metrics, rows)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def sweep(handle: ModelHandle, vector: V.SteeringVector, test: Sequence[Sample], layers: Sequence[int],
          alphas: Sequence[float], generate: bool = True, max_new_tokens: int = 16, batch_size: int = 8,
          progress: Callable | None = None, judge: str = "keyword",
          cache_dir: str | Path | None = None) -> list[dict]:
    """Layer × strength grid: refusal score (one forward) and, if ``generate``, judged refusal rates in/out.

    Returns one row per (layer, alpha) with ``layer, alpha, refusal_score_in/out`` and, when generating,
    ``refusal_rate_out, over_refusal_in, mb_score`` and an example answer of each scope. With ``cache_dir``, each
    generating cell is an :func:`evaluate` call cached there, and a score-only sweep is one
    :func:`refusal_score_grid` cached there.
    """
    rows = []
    test = list(test)
    grid = [(l, a) for l in layers for a in alphas]
    scores: dict[tuple[int, float], list[dict]] = {}
    if not generate:
        for r in refusal_score_grid(handle, vector, test, layers, alphas, batch_size=batch_size, cache_dir=cache_dir,
                                    progress=False):
            scores.setdefault((r["layer"], r["alpha"]), []).append(r)
    for layer, alpha in grid:
        row = {"layer": layer, "alpha": alpha}
        if generate:
            iv = [AddVector(vector.directions, (handle.check_layer(layer),), alpha)]
            res = evaluate(handle, test, iv, max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge,
                           progress=False, cache_dir=cache_dir)
            row.update({"refusal_score_out": res.metrics["mean_refusal_score_out"],
                        "refusal_score_in": res.metrics["mean_refusal_score_in"],
                        **{k: res.metrics[k] for k in ("refusal_rate_out", "over_refusal_in", "mb_score")}})
            row["example_out"] = next((r["response"] for r in res.rows if r["scope"] == "out"), "")
            row["example_in"] = next((r["response"] for r in res.rows if r["scope"] == "in"), "")
        else:
            cell = scores[(handle.check_layer(layer), float(alpha))]
            row.update({"refusal_score_out": _mean([r["score"] for r in cell if r["scope"] == "out"]),
                        "refusal_score_in": _mean([r["score"] for r in cell if r["scope"] == "in"])})
        rows.append(row)
        if progress:
            progress(row)
    return rows


def refusal_score_grid(handle: ModelHandle, vector: V.SteeringVector, samples: Sequence[Sample], layers: Sequence[int],
                       alphas: Sequence[float], batch_size: int = 8, cache_dir: str | Path | None = None,
                       progress: bool = True) -> list[dict]:
    """Per-prompt refusal scores with ``vector`` added at each single layer × strength (one forward per cell, no
    generation), for plots and widgets that must not run the model in their callbacks.

    Returns rows ``{layer, alpha, id, scope, subject, score}``; ``alpha = 0`` rows are the unsteered model (one
    forward, shared by every layer). With ``cache_dir``, the grid is saved under a key of its inputs and reused.
    """
    from tqdm.auto import tqdm

    samples = list(samples)
    if not samples:
        raise ValueError("refusal_score_grid: no samples (empty split)")
    layers = [handle.check_layer(int(l)) for l in layers]
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_path(cache_dir, "score-grid", {
            "model": handle.key, "vector": vector.fingerprint, "layers": layers, "alphas": [float(a) for a in alphas],
            "batch_size": batch_size, "samples": [[s.id, s.prompt] for s in samples],
            "directions": sha256_hex(vector.directions.float().numpy().tobytes())})
        if cache_file.exists():
            return json.loads(cache_file.read_text())
    prompts = [s.prompt for s in samples]
    unsteered = None
    rows = []
    cells = [(l, float(a)) for l in layers for a in alphas]
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
    if cache_file is not None:
        atomic_write_json(cache_file, rows)
    return rows
