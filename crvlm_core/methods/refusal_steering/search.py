"""Evaluation and strength search of Refusal Steering: one condition's refusal rates per subject (judged generations
or the first-token refusal score) and its change on the neutral prompts; α grown until the objective stops improving."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from crvlm_core.core.cache import cached_json
from crvlm_core.core.errors import InputError
from crvlm_core.core.io import sha256_hex
from crvlm_core.data.schema import Sample
from crvlm_core.judges.base import Judge
from crvlm_core.methods.refusal_steering.gate import TopicGate, steering_interventions
from crvlm_core.methods.refusal_steering.score import judge_key, judge_of
from crvlm_core.metrics import kl_to_unsteered, rates_by, unchanged_prefix_fraction
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector, intervention_fingerprint
from crvlm_core.steer.score import refusal_score, steered_logits

__all__ = ["ALPHA_GRID", "EvalConfig", "SearchConfig", "evaluate_condition", "search_alpha", "summary_row",
           "validation_objective", "warm_up"]

ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Strengths tried in order by :func:`search_alpha` (in units of the mean-difference norm per layer)."""
MODES = ("generate", "score")


@dataclass(frozen=True)
class EvalConfig:
    """How :func:`evaluate_condition` measures: ``mode`` ``"generate"`` (generation + ``judge``) or ``"score"``
    (first-token refusal score); ``neutral`` names the subject whose change is measured; ``cache_dir`` (None: off)
    keeps each result."""

    judge: str | Judge = "learned"
    neutral: str = "neutral"
    max_new_tokens: int = 24
    batch_size: int = 8
    progress: bool = False
    mode: str = "generate"
    cache_dir: str | os.PathLike | bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be 'generate' or 'score', got {self.mode!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise InputError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens}, "
                             f"{self.batch_size}")


def warm_up(handle: ModelHandle) -> None:
    """One tiny traced forward right after loading: nnsight reads a module's source at its first trace and keeps it,
    so later edits of the source file (several people share this tree) cannot desynchronise a long run."""
    steered_logits(handle, handle.build_inputs(["Hi"]), [AddVector(torch.zeros(handle.n_layers, handle.hidden_size),
                                                                   (0,), 0.0)], last_only=True)


def _neutral_logits(handle: ModelHandle, prompts: Sequence[str], interventions: Sequence[Intervention],
                    batch_size: int):
    """``(logits [b, seq, vocab], attention mask)`` per batch of the neutral prompts, one batch at a time."""
    for i in range(0, len(prompts), batch_size):
        enc = handle.build_inputs(prompts[i:i + batch_size])
        yield steered_logits(handle, enc, interventions), enc["attention_mask"].cpu()


def _neutral_change(handle: ModelHandle, samples: list[Sample], responses: list[str],
                    interventions: Sequence[Intervention], config: EvalConfig, unsteered: dict | None) -> dict:
    """``kl_neutral`` / ``unchanged_neutral`` against the reference, or the reference's own ``_logits``."""
    neutral_idx = [i for i, s in enumerate(samples) if s.subject == config.neutral]
    neutral_prompts = [samples[i].prompt for i in neutral_idx]
    batches = _neutral_logits(handle, neutral_prompts, interventions, config.batch_size)
    if unsteered is None:
        return {"_logits": list(batches), "kl_neutral": 0.0, "unchanged_neutral": 1.0}
    if "_logits" not in unsteered:  # a reference read from the cache
        unsteered["_logits"] = list(_neutral_logits(handle, neutral_prompts, (), config.batch_size))
    # compared batch by batch and dropped: full-vocabulary logits of every position are large (151 936 floats
    # per token on Qwen), so only the unsteered reference keeps them
    kls, weights = [], []
    for (ls, m), (lu, _) in zip(batches, unsteered["_logits"]):
        kls.append(kl_to_unsteered(ls, lu, m.bool()))
        weights.append(int(m.sum()))
    unchanged = unchanged_prefix_fraction([responses[i] for i in neutral_idx],
                                          [unsteered["responses"][i] for i in neutral_idx],
                                          handle.tokenizer) if neutral_idx and responses else None
    # None (JSON null): not measured (no neutral prompts; no answers in the score mode)
    return {"kl_neutral": float(np.average(kls, weights=weights)) if kls else None,
            "unchanged_neutral": unchanged}


def evaluate_condition(handle: ModelHandle, samples: Sequence[Sample], interventions: Sequence[Intervention] = (),
                       config: EvalConfig = EvalConfig(), *, unsteered: dict | None = None) -> dict:
    """Generate (steered), judge, and measure the change on the neutral prompts.

    ``config.mode="score"`` replaces generation + judge by the first-token refusal score (one forward per batch,
    :func:`crvlm_core.steer.score.refusal_score`; refused = log-odds > 0): ~10× cheaper, used for the
    strength search on CPU; responses are then empty and ``unchanged_neutral`` is ``None`` (not measured).

    Returns ``refusal_rate_by_subject``, ``responses``, ``refused``, ``n_by_subject``; without ``unsteered`` (the
    reference) the neutral prompts' logits (``_logits``, kept for later comparisons); and when ``unsteered`` (this
    function's result without interventions) is given, ``kl_neutral`` (mean KL(P_unsteered ‖ P_steered) over every
    token of the chat-formatted neutral prompts, the first answer token's distribution included) and
    ``unchanged_neutral`` (fraction of neutral answers whose first 20 tokens are unchanged).

    ``config.cache_dir``: when given, the result is saved there under a key made of the model (and organism
    adapter), the samples, the interventions' fingerprint, the judge, every setting and the reference's answers,
    and an unchanged call returns it without running the model. A cached reference carries no logits; a steered
    call that is not cached recomputes them once (one unsteered forward over the neutral prompts) and keeps them in
    the reference.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("evaluate_condition: no samples (empty split)")
    prompts = [s.prompt for s in samples]
    generate = config.mode == "generate"
    j = judge_of(config.judge) if generate else None  # the score mode judges nothing

    def compute() -> dict:
        if generate:
            responses = steered_generate(handle, prompts, interventions, max_new_tokens=config.max_new_tokens,
                                         batch_size=config.batch_size, progress=config.progress)
            refused = [v.refused for v in j.judge(prompts, responses)]
        else:
            responses = []
            refused = [bool(x > 0) for x in refusal_score(handle, prompts, interventions,
                                                          batch_size=config.batch_size)]
        res = {"refusal_rate_by_subject": rates_by(refused, [s.subject for s in samples]), "responses": responses,
               "refused": refused, "n_by_subject": {k: sum(s.subject == k for s in samples)
                                                    for k in sorted({s.subject for s in samples})}}
        return {**res, **_neutral_change(handle, samples, responses, interventions, config, unsteered)}

    key = {"model": handle.key, "samples": [[s.id, s.prompt, s.subject] for s in samples],
           "interventions": intervention_fingerprint(list(interventions)), "neutral": config.neutral,
           "mode": config.mode, "judge": judge_key(j) if j is not None else None,
           "max_new_tokens": config.max_new_tokens if generate else None, "batch_size": config.batch_size,
           "reference": None if unsteered is None else sha256_hex(json.dumps([unsteered["responses"],
                                                                               unsteered["refused"]]))}
    return cached_json(config.cache_dir, "condition", key, compute,
                       encode=lambda res: {k: v for k, v in res.items() if not k.startswith("_")})


def summary_row(name: str, res: dict) -> dict:
    """One metrics row of an evaluated condition (no responses, no logits)."""
    return {"condition": name, **{f"refusal_{k}": v for k, v in res["refusal_rate_by_subject"].items()},
            "kl_neutral": res["kl_neutral"], "unchanged_neutral": res["unchanged_neutral"]}


def validation_objective(rates: dict[str, float], base: dict[str, float], kl: float | None, remove: str, keep: str,
                         keep_tolerance: float = 0.05, keep_weight: float = 2.0, kl_weight: float = 1.0) -> float:
    """Lower is better: ``rate(remove) + keep_weight·max(0, base(keep) − rate(keep) − tol) + kl_weight·KL``
    (``kl`` None, not measured: no neutral prompts, gives NaN, as before, so no strength counts as better)."""
    drop = max(0.0, base[keep] - rates[keep] - keep_tolerance)
    return float(rates[remove] + keep_weight * drop + kl_weight * (float("nan") if kl is None else kl))


@dataclass(frozen=True)
class SearchConfig:
    """The strength search: ``alphas`` tried in increasing order, stopping after ``patience`` without improvement,
    then ``refine`` bisection steps; the objective's ``keep_tolerance`` / ``keep_weight`` / ``kl_weight``
    (:func:`validation_objective`); each evaluation as :class:`EvalConfig` (``max_new_tokens``, ``mode``, ...)."""

    remove: str = "political"
    keep: str = "harmful"
    neutral: str = "neutral"
    alphas: tuple[float, ...] = ALPHA_GRID
    operation: str = "subtract"
    patience: int = 2
    refine: int = 2
    judge: str | Judge = "learned"
    max_new_tokens: int = 20
    batch_size: int = 8
    mode: str = "generate"
    keep_tolerance: float = 0.05
    keep_weight: float = 2.0
    kl_weight: float = 1.0
    cache_dir: str | os.PathLike | bool | None = None

    def __post_init__(self) -> None:
        alphas = tuple(sorted(float(a) for a in self.alphas))
        if not alphas or alphas[0] <= 0:
            raise InputError(f"alphas must be positive, got {list(alphas)}")
        object.__setattr__(self, "alphas", alphas)
        if self.operation not in ("subtract", "project_out", "add"):
            raise InputError(f"unknown operation {self.operation!r}; choose subtract, project_out or add")
        if self.patience < 1 or self.refine < 0:
            raise InputError(f"patience must be >= 1 and refine >= 0, got {self.patience}, {self.refine}")
        self.eval_config()  # checks mode, max_new_tokens, batch_size

    def eval_config(self) -> EvalConfig:
        """How each strength is evaluated."""
        return EvalConfig(judge=self.judge, neutral=self.neutral, max_new_tokens=self.max_new_tokens,
                          batch_size=self.batch_size, mode=self.mode, cache_dir=self.cache_dir)

    def objective(self, rates: dict[str, float], base: dict[str, float], kl: float) -> float:
        """:func:`validation_objective` with this search's topics and weights."""
        return validation_objective(rates, base, kl, self.remove, self.keep, self.keep_tolerance,
                                    self.keep_weight, self.kl_weight)


def search_alpha(handle: ModelHandle, directions: torch.Tensor, layers: Sequence[int], val: Sequence[Sample],
                 config: SearchConfig = SearchConfig(), *, gate: TopicGate | None = None,
                 baseline: dict | None = None,
                 progress: Callable[[dict], None] | None = None) -> tuple[float, list[dict]]:
    """Try strengths in increasing order on the validation prompts and keep the one with the lowest
    :func:`validation_objective`. Early stopping: stop after ``patience`` strengths without improvement, or as
    soon as the remove-topic refusal rate reaches 0 (a larger α can then only raise the KL and lower the kept
    refusals). Then ``refine`` bisection steps between the best strength and the next larger one tried (which
    overshot or did not help), so a grid that starts too strong still finds a useful α. ``mode``: ``"generate"``
    (default; generation + judge) or ``"score"`` (first-token refusal score with the fixed rule log-odds > 0, ~10×
    cheaper; on Qwen2.5-0.5B that rule called none of the refused harmful validation prompts a refusal, so the
    search could not see the harmful refusals it must keep). ``cache_dir``: each evaluation is cached there
    (:func:`evaluate_condition`), so a repeated search runs no model. ``gate``: steer only the prompts it selects.

    Returns:
        ``(best α, rows)``, one row per tried α (rates, KL, unchanged fraction, objective).
    """
    ev = config.eval_config()
    baseline = baseline or evaluate_condition(handle, val, (), ev)
    base = baseline["refusal_rate_by_subject"]
    rows: list[dict] = []

    def trial(a: float) -> tuple[float, dict]:
        ivs = steering_interventions(directions, layers, a, config.operation, gate)
        r = evaluate_condition(handle, val, ivs, ev, unsteered=baseline)
        j = config.objective(r["refusal_rate_by_subject"], base, r["kl_neutral"])
        row = {"alpha": a, **{f"rate_{k}": v for k, v in r["refusal_rate_by_subject"].items()},
               "kl_neutral": r["kl_neutral"], "objective": j}
        if r["responses"]:
            row["unchanged_neutral"] = r["unchanged_neutral"]
        rows.append(row)
        if progress:
            progress(row)
        return j, r

    best, best_j, since = 0.0, config.objective(base, base, 0.0), 0
    for a in config.alphas:
        j, r = trial(a)
        if j < best_j - 1e-9:
            best, best_j, since = a, j, 0
        else:
            since += 1
        if since >= config.patience or r["refusal_rate_by_subject"][config.remove] == 0.0:
            break
    # refine: bisect between the best strength and the first larger one tried (it overshot or did not help)
    larger = [row["alpha"] for row in rows if row["alpha"] > best]
    hi = min(larger) if larger else None
    for _ in range(config.refine if hi is not None else 0):
        mid = (best + hi) / 2
        j, _ = trial(mid)
        if j < best_j - 1e-9:
            best, best_j = mid, j
        else:
            hi = mid
    return best, rows
