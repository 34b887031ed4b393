"""The fitting path of Refusal Steering for one method: score → confident sets → activations → layer ranking → λ → α,
configured by a frozen :class:`FitConfig`; the result (:class:`RefusalSteeringFit`) saves as one artifact."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from crvlm_core.core.artifacts import fingerprint, model_info
from crvlm_core.core.errors import InputError
from crvlm_core.core.io import sha256_hex
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import Sample, fingerprint as data_fingerprint
from crvlm_core.judges.base import Judge
from crvlm_core.methods.refusal_steering.artifact import save_refusal_steering
from crvlm_core.methods.refusal_steering.directions import METHODS, fit_directions
from crvlm_core.methods.refusal_steering.gate import TopicGate, best_topic_gate, interventions_of
from crvlm_core.methods.refusal_steering.score import (ScoredPrompt, confident_activations, judge_of, score_prompts,
                                                       select_confident)
from crvlm_core.methods.refusal_steering.search import ALPHA_GRID, MODES, SearchConfig, search_alpha
from crvlm_core.methods.refusal_steering.select import choose_lambda, layer_scores, rank_layers
from crvlm_core.methods.refusal_steering.topics import DATASET, TopicSplits, check_topics, topic_splits
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["FitConfig", "RefusalSteeringFit", "dump_fit", "fit_refusal_steering"]


@dataclass(frozen=True)
class FitConfig:
    """Settings of :func:`fit_refusal_steering`.

    ``method``: mean-diff, rmd or wrmd. ``remove`` / ``keep`` / ``neutral``: the subject whose refusals go, the
    one whose refusals stay, the one answered before and after. Scoring: ``judge``, ``k`` sampled responses of
    ``score_tokens`` tokens, confidence threshold ``tau``. Layers: the best ``n_layers_steer`` from ``min_layer``
    (None: a quarter of the way up). ``lam_rel``: rmd/wrmd ridge as a multiple of tr(Σ)/d (None: chosen by
    cross-fitting). Strength: ``alphas`` searched with ``operation`` on validation answers of ``val_tokens``
    tokens, by ``search_by`` (generate / score). ``gate``: True fits a topic gate (remove vs keep), or a given
    :class:`TopicGate`. ``cache_dir``: the strength search's evaluations (None: off).
    """

    method: str = "rmd"
    remove: str = "political"
    keep: str = "harmful"
    neutral: str = "neutral"
    judge: str | Judge = "learned"
    k: int = 3
    tau: float = 0.5
    score_tokens: int = 24
    n_layers_steer: int = 3
    min_layer: int | None = None
    lam_rel: float | None = None
    alphas: tuple[float, ...] = ALPHA_GRID
    operation: str = "subtract"
    val_tokens: int = 20
    batch_size: int = 8
    seed: int = 0
    search_by: str = "generate"
    gate: bool | TopicGate = False
    progress: bool = True
    cache_dir: str | os.PathLike | bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.lam_rel is not None and (not math.isfinite(self.lam_rel) or self.lam_rel < 0):
            raise InputError(f"λ must be >= 0, got {self.lam_rel}")
        if not 0.0 <= self.tau <= 1.0:
            raise InputError(f"tau must be in [0, 1], got {self.tau}")
        if self.k < 1 or self.n_layers_steer < 1:
            raise InputError(f"k and n_layers_steer must be >= 1, got {self.k}, {self.n_layers_steer}")
        if self.operation not in ("subtract", "project_out"):
            raise InputError(f"operation must be subtract or project_out, got {self.operation!r}")
        if self.search_by not in MODES:
            raise InputError(f"search_by must be 'generate' or 'score', got {self.search_by!r}")
        if len({self.remove, self.keep, self.neutral}) != 3:
            raise InputError(f"topics must differ, got {[self.remove, self.keep, self.neutral]}")
        object.__setattr__(self, "alphas", self.search_config().alphas)  # sorted, checked positive

    def search_config(self) -> SearchConfig:
        """The strength search this fit runs."""
        return SearchConfig(remove=self.remove, keep=self.keep, neutral=self.neutral, alphas=self.alphas,
                            operation=self.operation, judge=self.judge, max_new_tokens=self.val_tokens,
                            batch_size=self.batch_size, mode=self.search_by, cache_dir=self.cache_dir)

    def to_json(self) -> dict:
        """The settings as JSON (the judge by name, a given gate without its direction, no cache folder)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("cache_dir", "progress")}
        out["judge"] = self.judge if isinstance(self.judge, str) else getattr(self.judge, "name", str(self.judge))
        out["gate"] = self.gate if isinstance(self.gate, bool) else {
            k: v for k, v in self.gate.to_json().items() if k != "direction"}
        out["alphas"] = list(self.alphas)
        return out


@dataclass
class RefusalSteeringFit:
    """What :func:`fit_refusal_steering` found for one method; :meth:`save` writes it as one artifact."""

    vector: SteeringVector
    layer_scores: dict
    alpha_rows: list[dict]
    lambda_table: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    def interventions(self, alpha: float | None = None, layers: Sequence[int] | None = None) -> list[Intervention]:
        """The steering this fit describes (topic-gated when it has a gate)."""
        return interventions_of(self.vector, alpha=alpha, layers=layers)

    def save(self, folder: str | os.PathLike, *, force: bool = False, extra_json: dict | None = None) -> Path:
        """Write the ``refusal-steering`` artifact folder (vector, gate, settings), whole."""
        return save_refusal_steering(self.vector, folder, model=self.model, inputs=self.inputs, force=force,
                                     extra_json=extra_json)


def _layers_and_lambda(handle: ModelHandle, acts: dict, config: FitConfig,
                       log: Callable[[str], None]) -> tuple[list[int], dict, float | None, dict]:
    """``(steered layers, their cross-fitted scores, λ/mean-eigenvalue, λ table)``."""
    pos, neg, pc, nc = acts["pos"], acts["neg"], acts["pos_conf"], acts["neg_conf"]
    min_layer = handle.n_layers // 4 if config.min_layer is None else config.min_layer
    lam_rel, lam_table = config.lam_rel, {}
    if config.method != "mean-diff" and lam_rel is None:
        pre = rank_layers(layer_scores("mean-diff", pos, neg, seed=config.seed), config.n_layers_steer, min_layer)
        lam_rel, lam_table = choose_lambda(config.method, pos, neg, pre, pc, nc, seed=config.seed)
        log(f"[{config.method}] λ/mean-eigenvalue chosen {lam_rel} (cross-fitted d′ {lam_table})")
    scores = layer_scores(config.method, pos, neg, pc, nc, lam_rel=lam_rel or 0.0, seed=config.seed)
    layers = rank_layers(scores, config.n_layers_steer, min_layer)
    log(f"[{config.method}] steering layers {layers} (held-out AUC {[round(scores['auc'][l], 3) for l in layers]})")
    return layers, scores, lam_rel, lam_table


def fit_refusal_steering(handle: ModelHandle, config: FitConfig = FitConfig(), samples: Sequence[Sample] | None = None,
                         splits: TopicSplits | None = None, *, scored: list[ScoredPrompt] | None = None,
                         acts: dict | None = None, baseline_val: dict | None = None,
                         log: Callable[[str], None] = print) -> RefusalSteeringFit:
    """The whole fitting path for one method: score → confident sets → activations → layer ranking → λ → α.

    ``samples`` default to :data:`~crvlm_core.methods.refusal_steering.topics.DATASET`, ``splits`` to its seeded
    :func:`~crvlm_core.methods.refusal_steering.topics.topic_splits`. ``config.gate``: steer only the prompts a topic
    gate puts on the ``remove`` side of "``remove`` vs ``keep``" (fitted on the training prompts of both, at the
    layer that separates them best; or a given :class:`TopicGate`), so the refusals to keep are left alone even
    where the refusal direction is shared. Saved in the vector's ``extra["gate"]``; :func:`interventions_of`
    rebuilds it. ``scored``, ``acts`` (``{"pos", "neg", "pos_conf", "neg_conf"}``) and ``baseline_val`` can be
    passed in to share the expensive steps between methods (the study does). Scores and activations are always
    cached. Returns the saved-format vector (operation ``add`` with a negative α for subtraction, or
    ``project_out``) and the search logs.
    """
    c = config
    samples = list(samples) if samples is not None else load_dataset(DATASET)
    check_topics(samples, c.remove, c.keep, c.neutral)
    splits = splits or topic_splits(samples)
    if scored is None:
        scored = score_prompts(handle, splits.of("train", c.remove) + splits.of("train", c.neutral), c.judge, c.k,
                               c.score_tokens, seed=c.seed, batch_size=c.batch_size, progress=c.progress)
    refuse, comply = select_confident(scored, c.tau, min_per_side=2)  # 2-fold cross-fitting needs 2 per side
    log(f"[{c.method}] confident: {len(refuse)} refusals, {len(comply)} compliant (τ={c.tau}, {len(scored)} scored)")
    acts = acts if acts is not None else confident_activations(handle, refuse, comply, c.batch_size, c.progress)
    layers, scores, lam_rel, lam_table = _layers_and_lambda(handle, acts, c, log)
    directions = fit_directions(c.method, acts["pos"], acts["neg"], acts["pos_conf"], acts["neg_conf"],
                                lam_rel=lam_rel or 0.0)
    gate = c.gate
    if gate is True:
        gate = best_topic_gate(handle, splits.of("train", c.remove), splits.of("train", c.keep),
                               batch_size=c.batch_size)
        log(f"[{c.method}] topic gate {c.remove} vs {c.keep} at layer {gate.layer} "
            f"(training accuracy {gate.accuracy:.3f})")
    gate = gate or None
    alpha, rows = search_alpha(handle, directions, layers, splits.val, c.search_config(), gate=gate,
                               baseline=baseline_val, progress=lambda r: log(f"[{c.method}] α={r['alpha']}: " + ", ".join(
                                   f"{k}={v:.3f}" for k, v in r.items() if k != "alpha")))
    confident = [p.sample for p in refuse + comply]
    vector = SteeringVector(
        directions=directions, method=c.method, layers=layers,
        operation="project_out" if c.operation == "project_out" else "add",
        alpha=-alpha if c.operation == "subtract" and alpha else alpha, positions="last", model_spec=handle.spec,
        fingerprint=sha256_hex(handle.key, data_fingerprint(confident))[:20],
        extra={"kind": "refusal-steering", "remove": c.remove, "keep": c.keep, "neutral": c.neutral,
               "lambda_rel": lam_rel if c.method != "mean-diff" else None, "tau": c.tau, "k": c.k,
               "judge": getattr(judge_of(c.judge), "name", str(c.judge)), "n_refuse": len(refuse),
               "n_comply": len(comply), "operation": c.operation, "alpha_search": rows, "search_by": c.search_by,
               "layer_auc": scores["auc"], "layer_dprime": scores["dprime"], "model_key": handle.key,
               **({"gate": gate.to_json()} if gate is not None else {})})
    inputs = {"model": handle.key, "data": data_fingerprint(confident),
              "confidences": fingerprint([p.confidence for p in refuse + comply]), "settings": c.to_json()}
    return RefusalSteeringFit(vector, scores, rows, lam_table, model_info(handle), inputs)


def dump_fit(fit: RefusalSteeringFit) -> dict:
    """JSON-able summary of a fit (layers, α, λ, search rows)."""
    v = fit.vector
    return {"method": v.method, "layers": v.layers, "alpha": v.alpha, "operation": v.operation,
            "lambda_rel": v.extra.get("lambda_rel"), "lambda_table": {str(k): x for k, x in fit.lambda_table.items()},
            "alpha_search": fit.alpha_rows, "n_refuse": v.extra["n_refuse"], "n_comply": v.extra["n_comply"]}
