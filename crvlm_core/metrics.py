"""Configurable-refusal metrics: refusal rate on out-of-scope prompts (R), over-refusal rate on in-scope prompts
(ORR), their harmonic combination, the MB-score = 2·R·(1−ORR)/(R+1−ORR), seeded bootstrap CIs, and how much
steering changes the model (KL to the unsteered next-token distributions, unchanged-prefix fraction)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from crvlm_core.core.io import nan_to_none

__all__ = ["rate", "mb_score", "bootstrap_ci", "mb_score_ci", "mb_difference_ci", "paired_difference_ci",
           "scope_metrics", "rates_by", "kl_to_unsteered", "unchanged_prefix_fraction"]


def rate(flags: Sequence[bool]) -> float:
    """Fraction of true flags; NaN for an empty list."""
    flags = list(flags)
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


def mb_score(refusal_rate_out: float, over_refusal_in: float) -> float:
    """Harmonic mean of R and 1−ORR (0 when both are 0)."""
    keep = 1.0 - over_refusal_in
    denom = refusal_rate_out + keep
    return 0.0 if denom == 0 else 2.0 * refusal_rate_out * keep / denom


def _percentile_bootstrap(samples: Sequence[np.ndarray], statistic: Callable, n_boot: int, alpha: float, seed: int,
                          vectorized: bool = True) -> tuple[float, float]:
    """Seeded percentile bootstrap interval (:func:`scipy.stats.bootstrap`) of ``statistic(*samples)``, each sample
    resampled independently with replacement (the interval: quantiles ``alpha/2`` and ``1 − alpha/2`` of the
    resampled statistics). A one-element sample is held fixed (scipy needs two or more; every
    resample of it is the sample itself, and drawing its indices consumes no random numbers)."""
    from scipy.stats import bootstrap

    free = [i for i, x in enumerate(samples) if x.size > 1]
    if not free:
        value = float(statistic(*samples))
        return value, value

    def stat(*resampled, axis=-1):
        it = iter(resampled)
        return statistic(*[next(it) if i in free else x for i, x in enumerate(samples)])

    res = bootstrap([samples[i] for i in free], stat, n_resamples=n_boot, confidence_level=1 - alpha,
                    method="percentile", rng=np.random.default_rng(seed), vectorized=vectorized, paired=False)
    # the quantiles of scipy's bootstrap distribution at alpha/2 and 1 - alpha/2 exactly (scipy's own interval
    # goes through (1 - confidence_level)/2, which differs from alpha/2 in the last bit)
    low, high = np.quantile(res.bootstrap_distribution, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], stat: Callable[[np.ndarray], float] = np.mean, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat`` over ``values`` (flags count as 0/1), through
    :func:`scipy.stats.bootstrap`.

    Args:
        values: per-sample flags or values.
        stat: statistic of a resampled 1-D array (default: the mean, i.e. a rate for flags).
        n_boot: bootstrap resamples.
        alpha: 1 − coverage (0.05 → a 95 % interval).
        seed: seeds the resampling, so the interval is reproducible.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values.
    """
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if stat is np.mean:
        return _percentile_bootstrap([x], lambda s: s.mean(-1), n_boot, alpha, seed)
    return _percentile_bootstrap([x], stat, n_boot, alpha, seed, vectorized=False)


def _mb_of_resamples(out: np.ndarray, inn: np.ndarray) -> np.ndarray:
    """MB-score of the rates of resampled flags ``[..., n]`` (elementwise :func:`mb_score`)."""
    r, keep = out.mean(-1), 1.0 - inn.mean(-1)
    denom = r + keep
    return np.where(denom == 0, 0.0, 2.0 * r * keep / np.where(denom == 0, 1.0, denom))


def mb_score_ci(refused_out: Sequence[bool], refused_in: Sequence[bool], n_boot: int = 1000, alpha: float = 0.05,
                seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the MB-score: out-of-scope and in-scope flags are resampled independently
    (each within its own scope, keeping the scope sizes) and MB is recomputed from the resampled R and ORR."""
    out = np.asarray(refused_out, dtype=np.float64)
    inn = np.asarray(refused_in, dtype=np.float64)
    if out.size == 0 or inn.size == 0:
        return float("nan"), float("nan")
    return _percentile_bootstrap([out, inn], _mb_of_resamples, n_boot, alpha, seed)


def mb_difference_ci(out_a: Sequence[bool], in_a: Sequence[bool], out_b: Sequence[bool], in_b: Sequence[bool],
                     n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``MB(a) − MB(b)`` for two conditions measured on the same items (e.g. two fits on
    the same test pictures): the out-of-scope and in-scope items are resampled, each within its scope, and the same
    resampled items score both conditions, so what the two share cancels."""
    fa, fb = np.asarray(out_a, dtype=np.float64), np.asarray(out_b, dtype=np.float64)
    ia, ib = np.asarray(in_a, dtype=np.float64), np.asarray(in_b, dtype=np.float64)
    if fa.shape != fb.shape or ia.shape != ib.shape:
        raise ValueError("mb_difference_ci: the two conditions need the same items")
    if fa.size == 0 or ia.size == 0:
        return float("nan"), float("nan")

    def stat(o, i):  # resampled item indices [..., n]
        o, i = o.astype(int), i.astype(int)
        return _mb_of_resamples(fa[o], ia[i]) - _mb_of_resamples(fb[o], ib[i])

    return _percentile_bootstrap([np.arange(fa.size, dtype=np.float64), np.arange(ia.size, dtype=np.float64)], stat,
                                 n_boot, alpha, seed)


def paired_difference_ci(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, alpha: float = 0.05,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(a) − mean(b)`` for paired values (the same items measured twice, e.g.
    correct-answer flags steered and unsteered): the pairs are resampled together, i.e. :func:`bootstrap_ci` of the
    per-item differences, so what the two conditions share cancels and the interval is narrower than the two
    intervals' gap suggests. ``(nan, nan)`` for no pairs."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"paired_difference_ci: {len(a)} values against {len(b)}: pairs need equal lengths")
    return bootstrap_ci([float(x) - float(y) for x, y in zip(a, b)], n_boot=n_boot, alpha=alpha, seed=seed)


def scope_metrics(refused: Sequence[bool], scopes: Sequence[str], ci: bool = False, n_boot: int = 1000,
                  alpha: float = 0.05, seed: int = 0) -> dict:
    """R, ORR, MB and counts from per-sample refusal flags and scopes (``in``/``out``).

    With ``ci=True`` also ``refusal_rate_out_ci``, ``over_refusal_in_ci`` and ``mb_score_ci``: seeded percentile
    bootstrap intervals ``[low, high]`` (see :func:`bootstrap_ci`, :func:`mb_score_ci`).

    A rate over a scope with no samples, the MB-score without both scopes and their intervals are ``None`` (JSON
    null: not measured), so the dict is strict JSON.
    """
    if len(refused) != len(scopes):
        raise ValueError(f"{len(refused)} refusal flags but {len(scopes)} scopes")
    out = [r for r, s in zip(refused, scopes) if s == "out"]
    inn = [r for r, s in zip(refused, scopes) if s == "in"]
    r, orr = rate(out), rate(inn)
    mb = mb_score(r, orr) if out and inn else None
    metrics: dict[str, Any] = {"refusal_rate_out": nan_to_none(r), "over_refusal_in": nan_to_none(orr),
                               "mb_score": mb, "n_out": len(out), "n_in": len(inn)}
    if ci:
        metrics["refusal_rate_out_ci"] = [nan_to_none(v) for v in bootstrap_ci(out, n_boot=n_boot, alpha=alpha,
                                                                              seed=seed)]
        metrics["over_refusal_in_ci"] = [nan_to_none(v) for v in bootstrap_ci(inn, n_boot=n_boot, alpha=alpha,
                                                                             seed=seed + 1)]
        metrics["mb_score_ci"] = [nan_to_none(v) for v in mb_score_ci(out, inn, n_boot=n_boot, alpha=alpha,
                                                                      seed=seed + 2)]
    return metrics


def rates_by(refused: Sequence[bool], keys: Sequence[str]) -> dict[str, float]:
    """Refusal rate per group (e.g. per subject)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r, k in zip(refused, keys):
        groups[k].append(r)
    return {k: rate(v) for k, v in sorted(groups.items())}


def kl_to_unsteered(logits_steered: Any, logits_unsteered: Any, mask: Any = None) -> float:
    """Mean over positions of KL(P_unsteered ‖ P_steered) = Σ_v P_u(v)·(log P_u(v) − log P_s(v)) in nats, where P
    are the next-token softmax distributions. The direction takes expectations under the unsteered model: how
    surprised the steered model is by what the plain model would say (the usual "cost" of an intervention).

    Args:
        logits_steered / logits_unsteered: ``[..., vocab]`` logits (torch or numpy), same shape,
            e.g. ``[batch, seq, vocab]`` from :func:`crvlm_core.steer.score.steered_logits` on the same inputs.
        mask: optional ``[...]`` boolean/0-1 array selecting positions (e.g. the attention mask, to skip padding).

    Returns:
        The mean KL over selected positions (NaN if none).
    """
    import torch

    s = torch.as_tensor(np.asarray(logits_steered)) if not torch.is_tensor(logits_steered) else logits_steered
    u = torch.as_tensor(np.asarray(logits_unsteered)) if not torch.is_tensor(logits_unsteered) else logits_unsteered
    if s.shape != u.shape:
        raise ValueError(f"logit shapes differ: steered {tuple(s.shape)} vs unsteered {tuple(u.shape)}")
    s, u = s.reshape(-1, s.shape[-1]), u.reshape(-1, u.shape[-1])  # views: no copy
    rows = torch.arange(len(s))
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask)) if not torch.is_tensor(mask) else mask
        if tuple(m.shape) != tuple(logits_steered.shape[:-1]):
            raise ValueError(f"mask shape {tuple(m.shape)} does not match positions {tuple(logits_steered.shape[:-1])}")
        rows = m.reshape(-1).bool().nonzero().squeeze(1)
    if not len(rows):
        return float("nan")
    # float64, a few positions at a time: a [batch, seq, vocab] block in float64 with its softmax temporaries is
    # several GB for a 150 k-token vocabulary (measured: +3.9 GB for 8 prompts of 60 tokens on Qwen's vocabulary)
    total = 0.0
    for i in range(0, len(rows), _KL_ROWS):
        chunk = rows[i:i + _KL_ROWS]
        log_s = torch.log_softmax(s[chunk].double(), -1)
        log_u = torch.log_softmax(u[chunk].double(), -1)
        total += float((log_u.exp() * (log_u - log_s)).sum())
    return total / len(rows)


#: positions per float64 chunk in :func:`kl_to_unsteered` (16 × 151 936 × 8 bytes ≈ 19 MB per temporary on Qwen)
_KL_ROWS = 16


def unchanged_prefix_fraction(steered_texts: Sequence[str], unsteered_texts: Sequence[str], tokenizer: Any,
                              n_tokens: int = 20) -> float:
    """Fraction of (steered, unsteered) response pairs whose first ``n_tokens`` tokens are identical (a pair of
    texts shorter than that counts as unchanged only when both token sequences are equal up to ``n_tokens``)."""
    steered_texts, unsteered_texts = list(steered_texts), list(unsteered_texts)
    if len(steered_texts) != len(unsteered_texts):
        raise ValueError(f"{len(steered_texts)} steered but {len(unsteered_texts)} unsteered texts")
    if not steered_texts:
        return float("nan")
    same = 0
    for a, b in zip(steered_texts, unsteered_texts):
        ta = tokenizer.encode(a, add_special_tokens=False)[:n_tokens]
        tb = tokenizer.encode(b, add_special_tokens=False)[:n_tokens]
        same += list(ta) == list(tb)
    return same / len(steered_texts)
