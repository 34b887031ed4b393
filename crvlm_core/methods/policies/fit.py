"""Fitting a policy: one CR-VLM calibrator per refusing constraint and a logistic gate head per allowing one
(``composed``), or one calibrator for "refused vs allowed" (``union``); saved as one artifact folder, and reused
when the folder was fitted from the same model, constraints, options and training data."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from crvlm_core.core.artifacts import (FIT_JSON, ArtifactError, check_writable, fingerprint, model_info,
                                      read_manifest)
from crvlm_core.data.schema import Sample
from crvlm_core.data.schema import fingerprint as samples_fingerprint
from crvlm_core.extract import extract
from crvlm_core.methods.crvlm.calibrated import default_gate_layer
from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig
from crvlm_core.methods.crvlm.steering import fit_crvlm
from crvlm_core.methods.policies.artifact import KIND, load_policy_steering, save_policy
from crvlm_core.methods.policies.data import PolicyData, policy_data
from crvlm_core.methods.policies.spec import Policy, PolicyError
from crvlm_core.methods.policies.steering import PolicySteering
from crvlm_core.models.handle import ModelHandle

__all__ = ["fit_head", "fit_policy", "policy_inputs"]


def fit_head(x_pos: torch.Tensor, x_neg: torch.Tensor, seed: int) -> torch.nn.Linear:
    """Logistic regression (standardised, L2) of a constraint's prefill summaries against the others', folded into
    one Linear on raw summaries."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([x_pos, x_neg]).double()
    y = torch.cat([torch.ones(len(x_pos)), torch.zeros(len(x_neg))]).numpy()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=0.1, max_iter=5000, random_state=seed).fit(((x - mean) / scale).numpy(), y)
    w = torch.as_tensor(clf.coef_[0]) / scale
    head = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(w.float()[None])
        head.bias.fill_(float(clf.intercept_[0] - (w * mean).sum()))
    head.requires_grad_(False)
    return head


def _fit_calibrated(handle: ModelHandle, train: Sequence[Sample], opts: dict, progress: bool, cache_dir):
    behavioural = BehaviouralConfig(epochs=opts["behavioural_epochs"], seed=opts["seed"]) \
        if opts["behavioural_epochs"] > 0 else None
    config = CrvlmConfig(layers=opts["layers"], gate_layer="auto", width=opts["width"], epochs=opts["epochs"],
                         lr=opts["lr"], seed=opts["seed"], behavioural=behavioural)
    return fit_crvlm(handle, train, config, cache_dir=cache_dir, progress=progress)


def _fit_composed(handle: ModelHandle, policy: Policy, data: PolicyData, opts: dict, progress: bool,
                  cache_dir) -> tuple[PolicySteering, dict[str, float]]:
    allowed = [s for s in data.train if s.scope == "in"]
    if not allowed:
        raise PolicyError(f"policy {policy.name!r}: no training sample is allowed: the refusing calibrators need "
                          "data to answer (add an allowing constraint)")
    seconds: dict[str, float] = {}
    cals = {}
    for c in policy.refusing:
        t = time.perf_counter()
        own = [replace(s, scope="out") for s in data.of("train", c.name)]
        cals[c.name] = _fit_calibrated(handle, own + allowed, opts, progress, cache_dir)
        seconds[c.name] = time.perf_counter() - t
    gate_layer = default_gate_layer(handle)
    heads = {}
    if policy.allowing:
        summary = extract(handle, data.train, layers=[gate_layer], progress=progress and "gate summaries").at(
            gate_layer)
        for c in policy.allowing:
            t = time.perf_counter()
            pos = torch.tensor([c.name in data.membership[s.id] for s in data.train])
            heads[c.name] = fit_head(summary[pos], summary[~pos], opts["seed"])
            seconds[c.name] = time.perf_counter() - t
    return PolicySteering(policy, cals, heads, gate_layer), seconds


def policy_inputs(handle: ModelHandle, policy: Policy, opts: dict, data: PolicyData) -> dict:
    """What a policy fit depends on (its artifact's ``inputs``; ``fit.json``'s ``key`` is a prefix of their
    fingerprint): the model, the constraints, the fit options but ``n_test``, the training samples."""
    return {"model": handle.key, "policy": policy.to_dict()["constraints"],
            "opts": {k: v for k, v in opts.items() if k != "n_test"}, "train": samples_fingerprint(data.train)}


def _reused(out: Path, inputs: dict, handle: ModelHandle):
    try:
        if read_manifest(out, kinds=(KIND,))["inputs"] != fingerprint(inputs):
            return None
    except ArtifactError:
        return None
    return load_policy_steering(out, handle), json.loads((out / FIT_JSON).read_text(encoding="utf-8"))


def fit_policy(handle: ModelHandle, policy: Policy, out_dir: str | Path, progress: bool = True, reuse: bool = True,
               force: bool = False, cache_dir: str | Path | bool | None = True, **overrides) -> tuple[Any, dict]:
    """Fit what ``policy`` needs with its ``fit:`` options (``overrides`` win) and save it as one artifact folder
    ``out_dir`` (``fit.json`` with ``method: policy``, the policy, the calibrators and gate heads); nothing is
    written there before the fit is complete.

    Args:
        reuse: when ``out_dir`` holds a policy artifact fitted from the same model, constraints, options and
            training data, load it instead of refitting.
        force: replace whatever ``out_dir`` holds (else a non-empty folder that is not reused stops the fit).
        cache_dir: where each calibrator's resume checkpoints go (the one cache's convention; on by default): a fit
            killed midway resumes there to the same weights.

    Returns:
        ``(intervention, fit_summary)``: a :class:`PolicySteering` (``composed``) or a ``CalibratedSteering``
        (``union``).

    Raises:
        ArtifactExists: ``out_dir`` holds something, it is not reused, and ``force`` is false.
    """
    opts = policy.fit_options(**overrides)
    out = Path(out_dir)
    data = policy_data(policy, opts["n_train"], opts["n_test"], opts["seed"])
    inputs = policy_inputs(handle, policy, opts, data)
    found = _reused(out, inputs, handle) if reuse else None
    if found is not None:
        return found
    check_writable(out, force)  # before the fit: a refused folder costs nothing
    start = time.perf_counter()
    if opts["design"] == "union":
        steering = _fit_calibrated(handle, data.train, opts, progress, cache_dir)
        seconds = {"union": time.perf_counter() - start}
    else:
        steering, seconds = _fit_composed(handle, policy, data, opts, progress, cache_dir)
    fit = {"method": "policy", "design": opts["design"], "model": handle.spec, "policy": policy.name,
           "key": fingerprint(inputs)[:16], "options": opts, "fit_seconds": time.perf_counter() - start,
           "fit_seconds_by_part": seconds,
           "n_train": {c.name: len(data.of("train", c.name)) for c in policy.constraints},
           "layers": list(steering.layers), "gate_layer": steering.gate_layer,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    save_policy(out, policy, steering, fit, model=model_info(handle), inputs=inputs, force=force)
    return steering, fit
