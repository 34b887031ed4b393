"""Comparing a fitted method with the unsteered model: the mean first-token KL on in-scope prompts (cached) and one
row of the comparison table (R, ORR, MB with bootstrap intervals, KL, unchanged answers, fit time, tokens/s)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.cache import cached_json
from crvlm_core.core.io import nan_to_none
from crvlm_core.data.schema import Sample
from crvlm_core.methods.baselines.artifact import Baseline
from crvlm_core.metrics import kl_to_unsteered, scope_metrics, unchanged_prefix_fraction
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.interventions import intervention_fingerprint
from crvlm_core.steer.score import steered_logits

__all__ = ["comparison_row", "in_scope_kl"]


@torch.no_grad()
def _mean_kl(base: ModelHandle, method: Baseline, samples: list[Sample], batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(samples), batch_size):
        prompts = [s.prompt for s in samples[i:i + batch_size]]
        plain = steered_logits(base, base.build_inputs(prompts), [], last_only=True)[:, -1]
        steered = steered_logits(method.handle, method.handle.build_inputs(prompts, system=method.system),
                                 method.interventions, last_only=True)[:, -1]
        total += kl_to_unsteered(steered, plain) * len(prompts)
    return total / len(samples)


def in_scope_kl(base: ModelHandle, method: Baseline, samples: Sequence[Sample], batch_size: int = 8,
                cache_dir: str | Path | bool | None = None) -> float:
    """Mean KL(P_unsteered ‖ P_method) of the first answer token's distribution over ``samples`` (one forward per
    batch each; the method's system prompt, interventions and adapted weights are applied on its side).

    ``cache_dir`` (the one cache's convention; off by default): the value is stored as a ``kl`` entry keyed by both
    models' keys, the method's system prompt and interventions' fingerprint, the samples and the batch size, and an
    unchanged call returns it without running the models (as :func:`~crvlm_core.evaluation.evaluate`
    does)."""
    samples = list(samples)
    if not samples:
        return float("nan")
    key = {"base": base.key, "model": method.handle.key, "system": method.system,
           "interventions": intervention_fingerprint(list(method.interventions)),
           "samples": [[s.id, s.prompt] for s in samples], "batch_size": batch_size}
    return float(cached_json(cache_dir, "kl", key, lambda: _mean_kl(base, method, samples, batch_size)))


def comparison_row(name: str, result, unsteered_rows: Sequence[dict], tokenizer, kl_in: float,
                   fit_seconds: float | None, n_tokens: int = 20, seed: int = 0) -> dict:
    """One row of the comparison table from an :class:`~crvlm_core.evaluation.EvalResult`: R, ORR, MB
    with bootstrap 95 % CIs (``refusal_rate_out, r_lo, r_hi, over_refusal_in, orr_lo, orr_hi, mb_score, mb_lo,
    mb_hi``), KL on in-scope prompts, the fraction of in-scope answers whose first ``n_tokens`` tokens equal the
    unsteered model's, fit seconds and generation tokens/s."""
    rows = result.rows
    m = scope_metrics([r["refused"] for r in rows], [r["scope"] for r in rows], ci=True, seed=seed)
    plain = {r["id"]: r["response"] for r in unsteered_rows}
    in_rows = [r for r in rows if r["scope"] == "in" and r["id"] in plain]
    unchanged = unchanged_prefix_fraction([r["response"] for r in in_rows], [plain[r["id"]] for r in in_rows],
                                          tokenizer, n_tokens)
    return {"method": name,
            "refusal_rate_out": m["refusal_rate_out"], "r_lo": m["refusal_rate_out_ci"][0],
            "r_hi": m["refusal_rate_out_ci"][1],
            "over_refusal_in": m["over_refusal_in"], "orr_lo": m["over_refusal_in_ci"][0],
            "orr_hi": m["over_refusal_in_ci"][1],
            "mb_score": m["mb_score"], "mb_lo": m["mb_score_ci"][0], "mb_hi": m["mb_score_ci"][1],
            "kl_in": nan_to_none(kl_in), f"unchanged_{n_tokens}": nan_to_none(unchanged),
            "fit_seconds": fit_seconds,  # None (JSON null): not measured
            "tokens_per_second": result.metrics["tokens_per_second"], "n_out": m["n_out"], "n_in": m["n_in"],
            "judge": result.metrics["judge"]}
