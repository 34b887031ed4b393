"""CR-VLM with and without L_vision on image-scoped data, measured as the paper does (#20; notebook 04's vision part
and ``scripts/measure_vision_scope.py``): R / ORR / MB with intervals, the fraction of in-scope answers unchanged in
their first tokens, the cosine of each predicted shift with its vision-only counterfactual shift (Table 5), the
refusal score of the picture alone with blank text (Figure 6), and the with − without differences with paired
bootstrap intervals (the same test pictures measured twice)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from crvlm_core.data.schema import Sample
from crvlm_core.evaluation import evaluate
from crvlm_core.methods.crvlm.config import CrvlmConfig
from crvlm_core.methods.crvlm.steering import fit_crvlm, vision_counterfactual_shifts
from crvlm_core.metrics import bootstrap_ci, mb_difference_ci, paired_difference_ci, scope_metrics, \
    unchanged_prefix_fraction
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.score import refusal_score

__all__ = ["VARIANTS", "scope_probe", "vision_ablation"]

#: The two fits compared: name → weight of L_vision.
VARIANTS = {"with L_vision": 1.0, "without L_vision": 0.0}


def _mean_ci(values) -> dict:
    values = [float(v) for v in values]
    lo, hi = bootstrap_ci(values)
    return {"mean": float(np.mean(values)), "ci95": [lo, hi]}


def scope_probe(vlm: ModelHandle, train: Sequence[Sample], test: Sequence[Sample], layers: Sequence[int], *,
                batch_size: int = 8, seed: int = 0) -> dict[int, dict]:
    """How well the scope can be read from the language model at all: a logistic probe for in vs out of scope on the
    last prompt token's state at each of ``layers`` (standardised, fitted on ``train``), its ROC AUC and accuracy on
    ``test``. The ceiling a gate reading that state can reach. ``{layer: {"auc", "accuracy", "n_train", "n_test"}}``."""
    from sklearn.metrics import roc_auc_score

    from crvlm_core.extract import extract
    from crvlm_core.judges.readout import LinearReadout

    acts = {name: extract(vlm, samples, layers=list(layers), batch_size=batch_size, cache_dir=False,
                          progress=False).acts.numpy() for name, samples in (("train", train), ("test", test))}
    y_train, y_test = ([s.scope == "in" for s in samples] for samples in (train, test))
    out = {}
    for j, layer in enumerate(layers):
        readout = LinearReadout.fit(acts["train"][:, j], y_train, C=0.1, seed=seed, class_weight="balanced")
        p = readout.probability(acts["test"][:, j])
        out[int(layer)] = {"auc": float(roc_auc_score(y_test, p)),
                           "accuracy": float(np.mean((p > 0.5) == np.asarray(y_test))),
                           "n_train": len(y_train), "n_test": len(y_test)}
    return out


def vision_ablation(vlm: ModelHandle, train: Sequence[Sample], test: Sequence[Sample], config: CrvlmConfig, *,
                    max_new_tokens: int = 20, batch_size: int = 8, judge: str = "keyword",
                    cal_cache: str | Path | bool | None = True, eval_cache: str | Path | bool | None = None,
                    progress: bool = False) -> dict:
    """Fit CR-VLM on ``train`` with and without L_vision (``config`` otherwise) and measure both on ``test`` (scoped,
    every sample with a picture). Returns ``{"unsteered": {...}, "variants": {name: {...}}, "differences": {...},
    "steerings": {name: CalibratedSteering}}``; every number but the steerings is JSON."""
    train, test = list(train), list(test)
    if any(s.image is None for s in [*train, *test]):
        raise ValueError("vision_ablation: every training and test sample needs a picture")
    scopes = [s.scope for s in test]
    out_idx = [i for i, s in enumerate(scopes) if s == "out"]
    in_idx = [i for i, s in enumerate(scopes) if s == "in"]
    test_out, test_in = [test[i] for i in out_idx], [test[i] for i in in_idx]
    images = [s.load_image() for s in test]
    blank = [""] * len(test)

    def scores_of(ivs) -> list[float]:
        return [float(x) for x in refusal_score(vlm, blank, ivs, images=images, batch_size=batch_size)]

    def judged(ivs):
        return evaluate(vlm, test, ivs, max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge,
                        progress=progress, cache_dir=eval_cache)

    base = judged([])
    base_flags = [bool(r["refused"]) for r in base.rows]
    base_scores = scores_of([])
    result = {"unsteered": {**scope_metrics(base_flags, scopes, ci=True),
                            "image_only_score_out": _mean_ci([base_scores[i] for i in out_idx]),
                            "image_only_score_in": _mean_ci([base_scores[i] for i in in_idx])},
              "variants": {}, "steerings": {}}
    flags, image_scores = {}, {}
    for name, w_vision in VARIANTS.items():
        steering = fit_crvlm(vlm, train, replace(config, w_vision=w_vision), cache_dir=cal_cache, progress=progress)
        res = judged([steering])
        flags[name] = [bool(r["refused"]) for r in res.rows]
        image_scores[name] = scores_of([steering])
        cf, mask, _ = vision_counterfactual_shifts(vlm, test_out, test_in, steering.layers, seed=config.seed,
                                                   batch_size=batch_size, progress=False)
        original, calibrated, rho = steering.calibrated_states(vlm, test, batch_size=batch_size)
        pred = (calibrated - original)[out_idx][mask]
        cos = torch.nn.functional.cosine_similarity(pred, cf[mask], dim=-1)  # [n, L]
        cos_of_sums = torch.nn.functional.cosine_similarity(pred.sum(0), cf[mask].sum(0), dim=-1)
        unchanged = unchanged_prefix_fraction([res.rows[i]["response"] for i in in_idx],
                                              [base.rows[i]["response"] for i in in_idx], vlm.tokenizer,
                                              n_tokens=max_new_tokens)
        result["variants"][name] = {
            "w_vision": w_vision, **scope_metrics(flags[name], scopes, ci=True),
            f"unchanged_{max_new_tokens}_in": unchanged,
            "shift_cosine": _mean_ci(cos.mean(-1).tolist()), "shift_cosine_of_sums": float(cos_of_sums.mean()),
            "image_only_score_out": _mean_ci([image_scores[name][i] for i in out_idx]),
            "image_only_score_in": _mean_ci([image_scores[name][i] for i in in_idx]),
            "gate_out": float(rho[out_idx].mean()), "gate_in": float(rho[in_idx].mean()),
            "vision_loss": steering.info.get("vision_loss"), "fit_seconds": steering.info.get("fit_seconds"),
            "rows": res.rows,
        }
        result["steerings"][name] = steering
    a, b = VARIANTS
    mb_a, mb_b = result["variants"][a]["mb_score"], result["variants"][b]["mb_score"]
    result["differences"] = {
        "mb_score": {"difference": mb_a - mb_b, "ci95": list(mb_difference_ci(
            [flags[a][i] for i in out_idx], [flags[a][i] for i in in_idx],
            [flags[b][i] for i in out_idx], [flags[b][i] for i in in_idx]))},
        "image_only_score_out": {
            "difference": float(np.mean([image_scores[a][i] - image_scores[b][i] for i in out_idx])),
            "ci95": list(paired_difference_ci([image_scores[a][i] for i in out_idx],
                                              [image_scores[b][i] for i in out_idx]))},
        "image_only_score_in": {
            "difference": float(np.mean([image_scores[a][i] - image_scores[b][i] for i in in_idx])),
            "ci95": list(paired_difference_ci([image_scores[a][i] for i in in_idx],
                                              [image_scores[b][i] for i in in_idx]))},
    }
    result["unsteered"]["rows"] = base.rows
    return result
