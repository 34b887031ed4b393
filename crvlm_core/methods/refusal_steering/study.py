"""The Refusal Steering study of notebook 06: every method (and its topic-gated variant) fitted on one model with the
expensive steps shared, evaluated on the held-out prompts, and gathered into the notebook's ``metrics.json``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from crvlm_core.core.io import atomic_write_json
from crvlm_core.data.schema import Sample
from crvlm_core.methods.refusal_steering.directions import METHODS
from crvlm_core.methods.refusal_steering.fit import FitConfig, dump_fit, fit_refusal_steering
from crvlm_core.methods.refusal_steering.gate import best_topic_gate
from crvlm_core.methods.refusal_steering.score import confident_activations, score_prompts, select_confident
from crvlm_core.methods.refusal_steering.search import ALPHA_GRID, EvalConfig, evaluate_condition, summary_row
from crvlm_core.methods.refusal_steering.select import layer_profile
from crvlm_core.methods.refusal_steering.topics import TopicSplits
from crvlm_core.models.handle import ModelHandle
from crvlm_core.models.organism import ORGANISMS, adapter_dir

__all__ = ["StudyConfig", "finite", "fit_all", "organism_summary", "score_topics", "slug", "study_metrics",
           "table_rows", "unsteered", "write_study_metrics"]


@dataclass(frozen=True)
class StudyConfig:
    """The notebook's parameters: topics, ``methods`` and the ones also fitted with a topic gate (``gated``), the
    judge and scoring (``k``, ``tau``, ``score_tokens``), the search (``alphas``, ``operation``, ``search_by``), the
    test generation length (``eval_tokens``), the split sizes reported, and where evaluations are cached."""

    model: str = "qwen2.5-0.5b"
    organism: str | None = None
    remove: str = "political"
    keep: str = "harmful"
    neutral: str = "neutral"
    methods: tuple[str, ...] = METHODS
    gated: tuple[str, ...] = METHODS
    judge: str = "learned"
    k: int = 3
    tau: float = 0.5
    score_tokens: int = 12
    eval_tokens: int = 16
    n_layers_steer: int = 3
    operation: str = "subtract"
    search_by: str = "generate"
    alphas: tuple[float, ...] = ALPHA_GRID
    induce_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    batch_size: int = 16
    n_train: int | None = None
    n_val: int = 6
    n_test: int = 8
    smoke: bool = False
    eval_cache: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        for name in ("methods", "gated", "alphas", "induce_alphas"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [m for m in self.methods + self.gated if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        FitConfig(remove=self.remove, keep=self.keep, neutral=self.neutral, tau=self.tau, k=self.k,
                  operation=self.operation, search_by=self.search_by, alphas=self.alphas)  # checks the rest

    @property
    def conditions(self) -> list[str]:
        """A fitted method, or one with a topic gate (``<method>+gate``)."""
        return [*self.methods, *[f"{m}+gate" for m in self.gated]]

    def test_eval(self) -> EvalConfig:
        """The held-out evaluation: judged generations of ``eval_tokens`` tokens, cached."""
        return EvalConfig(self.judge, self.neutral, self.eval_tokens, self.batch_size, progress=True,
                          cache_dir=self.eval_cache)

    def fit_config(self, method: str, gate) -> FitConfig:
        """The fit of one condition (the scored data, activations and validation baseline are shared)."""
        return FitConfig(method=method, remove=self.remove, keep=self.keep, neutral=self.neutral, judge=self.judge,
                         k=self.k, tau=self.tau, score_tokens=self.score_tokens,
                         n_layers_steer=self.n_layers_steer, alphas=self.alphas, operation=self.operation,
                         batch_size=self.batch_size, search_by=self.search_by, gate=gate,
                         cache_dir=self.eval_cache)


def slug(spec: str) -> str:
    """A model spec as a folder name."""
    return spec.replace("/", "_").replace("+", "_")


def unsteered(handle: ModelHandle, test: Sequence[Sample], config: StudyConfig) -> dict:
    """The model's held-out result without steering: ``{"spec", "unsteered" (metrics row), "_base_test"}``."""
    base_test = evaluate_condition(handle, test, (), config.test_eval())
    res = {"spec": handle.spec, "unsteered": summary_row("unsteered", base_test), "_base_test": base_test}
    print(f"{handle.spec} unsteered:", res["unsteered"])
    return res


def score_topics(handle: ModelHandle, splits: TopicSplits, subjects: Sequence[str], config: StudyConfig) -> list:
    """Judge-scored training prompts of ``subjects``, one cached scoring per subject."""
    return [p for subject in subjects
            for p in score_prompts(handle, splits.of("train", subject), config.judge, config.k, config.score_tokens,
                                   batch_size=config.batch_size)]


def _shared_steps(handle: ModelHandle, res: dict, splits: TopicSplits, config: StudyConfig) -> dict | None:
    """Score, select and read the activations once for every condition; None (and ``res["skipped"]``) when the
    model refuses too few training prompts confidently."""
    scored = score_topics(handle, splits, (config.remove, config.neutral), config)
    res["scored"] = {"n": len(scored), "mean_confidence_by_subject": {
        s: sum(p.confidence for p in scored if p.sample.subject == s) / max(1, sum(p.sample.subject == s for p in scored))
        for s in (config.remove, config.neutral)}}
    try:
        refuse, comply = select_confident(scored, config.tau, min_per_side=4)
    except ValueError as err:
        res["skipped"] = str(err)
        print(f"{handle.spec}: fit skipped: {err}")
        return None
    val_eval = EvalConfig(config.judge, config.neutral, config.score_tokens, config.batch_size,
                          mode=config.search_by, cache_dir=config.eval_cache)
    return {"scored": scored, "acts": confident_activations(handle, refuse, comply, config.batch_size),
            "base_val": evaluate_condition(handle, splits.val, (), val_eval)}


def fit_all(handle: ModelHandle, res: dict, data: tuple[Sequence[Sample], TopicSplits, Sequence[Sample]],
            config: StudyConfig, out_dir: str | os.PathLike, on_condition: Callable[[], object] | None = None) -> dict:
    """Fit every condition on ``data = (samples, splits, test)`` sharing the scored data, the activations and the
    unsteered validation pass; save each as an artifact under ``out_dir/<model>/<condition>``; evaluate it on the
    test prompts at its chosen strength; then the layer profile and the test answers. ``on_condition`` runs after
    each condition (the notebook rewrites ``metrics.json``)."""
    samples, splits, test = data
    shared = _shared_steps(handle, res, splits, config)
    if shared is None:
        return res
    base_test, acts = res["_base_test"], shared["acts"]
    lam, examples = {}, {"unsteered": base_test["responses"]}
    gate = best_topic_gate(handle, splits.of("train", config.remove), splits.of("train", config.keep),
                           batch_size=config.batch_size) if config.gated else None
    if gate is not None:
        res["gate"] = {k: v for k, v in gate.to_json().items() if k != "direction"}
        print(f"{handle.spec}: topic gate {config.remove} vs {config.keep} at layer {gate.layer}, "
              f"training accuracy {gate.accuracy:.3f}")
    for cond in config.conditions:
        method, gated = cond.removesuffix("+gate"), cond.endswith("+gate")
        fit = fit_refusal_steering(handle, config.fit_config(method, gate if gated else False), samples, splits,
                                   scored=shared["scored"], acts=acts, baseline_val=shared["base_val"])
        fit.save(Path(out_dir) / slug(handle.spec) / cond.replace("+", "_"), force=True)
        r = evaluate_condition(handle, test, fit.interventions(), config.test_eval(), unsteered=base_test)
        res[cond] = {**summary_row(cond, r), **dump_fit(fit)}
        if not gated:
            lam[method] = fit.vector.extra.get("lambda_rel") or 1.0
        examples[cond] = r["responses"]
        print(f"{handle.spec} {cond}:", summary_row(cond, r), "layers", fit.vector.layers, "alpha", fit.vector.alpha)
        if on_condition is not None:
            on_condition()
    res["profile"] = layer_profile(acts["pos"], acts["neg"], acts["pos_conf"], acts["neg_conf"], lam)
    res["examples"] = [{"id": s.id, "subject": s.subject, "prompt": s.prompt,
                        **{k: v[i] for k, v in examples.items()}} for i, s in enumerate(test)]
    return res


def organism_summary(spec: str) -> dict:
    """Training facts of a refusal organism's adapter (its ``organism.json``)."""
    info = json.loads((adapter_dir(spec, ORGANISMS[spec]) / "organism.json").read_text())
    return {"train_seconds": info["train_seconds"], "n_examples": info["n_examples"],
            "first_loss": info["losses"][0], "final_loss": info["losses"][-1], "key": info["key"]}


def finite(x):
    """``x`` with NaN / inf replaced by None and private (``_``) keys dropped: strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def table_rows(results: dict, config: StudyConfig) -> list[dict]:
    """One row per model and condition: refusal rates of the three topics, KL, unchanged fraction, layers, α, λ."""
    rows = []
    for spec, res in results.items():
        for cond in ["unsteered", *config.conditions]:
            if cond in res:
                r = res[cond]
                rows.append({"model": spec, "condition": cond, "political": r[f"refusal_{config.remove}"],
                             "harmful": r[f"refusal_{config.keep}"], "neutral": r[f"refusal_{config.neutral}"],
                             "kl_neutral": r["kl_neutral"], "unchanged_neutral": r["unchanged_neutral"],
                             "layers": r.get("layers", []), "alpha": r.get("alpha", 0.0),
                             "lambda_rel": r.get("lambda_rel")})
    return rows


def study_metrics(results: dict, induction: dict, config: StudyConfig) -> dict:
    """The notebook's ``metrics.json`` (keys kept for the workbook's readers)."""
    c = config
    topics = (c.remove, c.keep, c.neutral)
    rates = lambda res, cond: {s: res[cond][f"refusal_{s}"] for s in topics}
    fit_keys = ("layers", "alpha", "lambda_rel", "lambda_table", "alpha_search", "n_refuse", "n_comply")
    return {
        "model": c.model, "organism": c.organism, "remove": c.remove, "keep": c.keep, "neutral": c.neutral,
        "judge": c.judge, "k": c.k, "tau": c.tau, "n_train_per_subject": c.n_train, "n_val_per_subject": c.n_val,
        "n_test_per_subject": c.n_test, "eval_tokens": c.eval_tokens, "score_tokens": c.score_tokens,
        "search_by": c.search_by, "operation": c.operation, "smoke": bool(c.smoke),
        "refusal_rate_by_subject": {spec: {cond: rates(res, cond) for cond in ["unsteered", *c.conditions]
                                           if cond in res} for spec, res in results.items()},
        "table": table_rows(results, c),
        "fits": {spec: {m: {k: res[m][k] for k in fit_keys} for m in c.conditions if m in res}
                 for spec, res in results.items()},
        "scored": {spec: res.get("scored") for spec, res in results.items()},
        "skipped": {spec: res["skipped"] for spec, res in results.items() if "skipped" in res},
        "profile": {spec: res["profile"] for spec, res in results.items() if "profile" in res},
        "gate": {spec: res["gate"] for spec, res in results.items() if "gate" in res},
        "organism_adapter": results.get(c.organism, {}).get("organism") if c.organism else None,
        "induction": induction,
        "examples": {spec: res.get("examples", [])[:6] for spec, res in results.items()},
    }


def write_study_metrics(path: str | os.PathLike, results: dict, induction: dict, config: StudyConfig) -> Path:
    """Write :func:`study_metrics` as strict JSON (NaN → null), atomically."""
    return atomic_write_json(path, finite(study_metrics(results, induction, config)))
