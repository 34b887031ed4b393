"""Judge-scored training data: K sampled responses per prompt, each judged with a confidence in [−1, 1]; the confident
refusals (c ≥ τ) and compliances (c ≤ −τ), and their last-prompt-token activations at every layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from crvlm_core.core.cache import cached_json
from crvlm_core.data.schema import Sample, fingerprint as data_fingerprint
from crvlm_core.extract import extract
from crvlm_core.judges.base import Judge, aggregate_confidence
from crvlm_core.judges.registry import get_judge
from crvlm_core.models.handle import ModelHandle

__all__ = ["ScoredPrompt", "confident_activations", "judge_key", "judge_of", "sample_responses", "score_prompts",
           "select_confident"]


@dataclass
class ScoredPrompt:
    """One prompt, its K responses and the judge's confidences (``confidence`` = mean over K, in [−1, 1])."""

    sample: Sample
    responses: list[str]
    confidences: list[float]

    @property
    def confidence(self) -> float:
        return aggregate_confidence(self.confidences)


def judge_of(judge: str | Judge) -> Judge:
    """The judge object for a name (``keyword``, ``learned``, ``llm``) or the judge itself."""
    return get_judge(judge) if isinstance(judge, str) else judge


def judge_key(judge: Judge) -> dict:
    """What identifies a judge's verdicts in a cache key: its name and, for a trained judge, its weights' digest."""
    return {"judge": getattr(judge, "name", str(judge)), "judge_fp": getattr(judge, "info", {}).get("fingerprint", "")}


@torch.no_grad()
def sample_responses(handle: ModelHandle, prompts: Sequence[str], k: int = 3, max_new_tokens: int = 24,
                     temperature: float = 0.7, top_p: float = 0.95, batch_size: int = 8, seed: int = 0,
                     progress: bool = True) -> list[list[str]]:
    """``k`` responses per prompt: sampled (temperature, top-p; seeded per batch) when ``k > 1``, greedy when 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    prompts = list(prompts)
    out: list[list[str]] = []
    starts = range(0, len(prompts), batch_size)
    for b, i in enumerate(tqdm(starts, desc=f"sample K={k}", disable=not progress, unit="batch")):
        enc = handle.build_inputs(prompts[i:i + batch_size])
        kw = dict(max_new_tokens=max_new_tokens, pad_token_id=handle.tokenizer.pad_token_id)
        if k > 1:
            torch.manual_seed(seed * 100_003 + b)
            kw.update(do_sample=True, temperature=temperature, top_p=top_p, num_return_sequences=k)
        else:
            kw.update(do_sample=False)
        ids = handle.hf_model.generate(**enc, **kw)
        texts = handle.decode_new(ids, enc["input_ids"].shape[1])
        out += [texts[j * k:(j + 1) * k] for j in range(len(texts) // k)]
    return out


def score_prompts(handle: ModelHandle, samples: Sequence[Sample], judge: str | Judge = "learned", k: int = 3,
                  max_new_tokens: int = 24, temperature: float = 0.7, seed: int = 0, batch_size: int = 8,
                  cache_dir: str | os.PathLike | bool | None = True, progress: bool = True) -> list[ScoredPrompt]:
    """Generate ``k`` responses per prompt and score each with the judge's confidence in [−1, 1].

    Judges without a graded confidence (the keyword rule) give ±1. ``cache_dir`` (default True:
    ``outputs/cache/``): results are cached there keyed by the model (and organism adapter), the data and every
    setting (:func:`crvlm_core.core.cache.cached_json`).
    """
    samples = list(samples)
    if not samples:
        raise ValueError("score_prompts: no samples")
    j = judge_of(judge)
    key = {"model": handle.key, "data": data_fingerprint(samples), "k": k, "tokens": max_new_tokens,
           "t": temperature, "seed": seed, **judge_key(j)}

    def compute() -> list[ScoredPrompt]:
        responses = sample_responses(handle, [s.prompt for s in samples], k, max_new_tokens, temperature,
                                     batch_size=batch_size, seed=seed, progress=progress)
        flat_p = [s.prompt for s, rs in zip(samples, responses) for _ in rs]
        flat_r = [r for rs in responses for r in rs]
        verdicts = j.judge(flat_p, flat_r)
        conf = [float(v.confidence) if v.confidence is not None else (1.0 if v.refused else -1.0) for v in verdicts]
        scored, pos = [], 0
        for s, rs in zip(samples, responses):
            scored.append(ScoredPrompt(s, rs, conf[pos:pos + len(rs)]))
            pos += len(rs)
        return scored

    def decode(rows: list[dict]) -> list[ScoredPrompt]:
        if [r["id"] for r in rows] != [s.id for s in samples]:
            raise ValueError("cached scores belong to other samples")
        return [ScoredPrompt(s, r["responses"], r["confidences"]) for s, r in zip(samples, rows)]

    return cached_json(cache_dir, "refusal-steering-scores", key, compute,
                       encode=lambda scored: [{"id": p.sample.id, "responses": p.responses,
                                               "confidences": p.confidences} for p in scored],
                       decode=decode)


def select_confident(scored: Sequence[ScoredPrompt], tau: float = 0.5,
                     min_per_side: int = 1) -> tuple[list[ScoredPrompt], list[ScoredPrompt]]:
    """Split scored prompts into confident refusals (``c ≥ τ``) and confident compliances (``c ≤ −τ``).

    Raises:
        ValueError: If ``τ`` is outside [0, 1], either side is empty (the message says how many were scored and
            the confidence range seen) or has fewer than ``min_per_side`` prompts.
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    refuse = [p for p in scored if p.confidence >= tau]
    comply = [p for p in scored if p.confidence <= -tau]
    for name, side, hint in (("refusals", refuse, "the model refuses none of them: use a model that refuses "
                              "(e.g. the organism qwen2.5-0.5b+censored)"),
                             ("compliant answers", comply, "the model refuses all of them")):
        if not side:
            confs = [p.confidence for p in scored]
            rng = f"[{min(confs):.2f}, {max(confs):.2f}]" if confs else "[]"
            raise ValueError(f"no confident {name} (|confidence| ≥ τ={tau}) among {len(scored)} scored prompts "
                             f"(confidences in {rng}): {hint}, or lower tau")
    if min(len(refuse), len(comply)) < min_per_side:
        raise ValueError(f"too few confident examples to fit: {len(refuse)} refusals and {len(comply)} compliant "
                         f"(|confidence| ≥ τ={tau}, {len(scored)} scored); need at least {min_per_side} per side")
    return refuse, comply


def confident_activations(handle: ModelHandle, refuse: Sequence[ScoredPrompt], comply: Sequence[ScoredPrompt],
                          batch_size: int = 8, progress: bool = True) -> dict:
    """Last-prompt-token states at every layer of the confident refusals and compliances, with their confidences
    (cached in ``outputs/cache/``, keyed by the model and organism adapter, the prompts and the layers)."""
    pos = extract(handle, [p.sample for p in refuse], batch_size=batch_size, cache_dir=True,
                  progress=progress and "activations (refuse)").acts
    neg = extract(handle, [p.sample for p in comply], batch_size=batch_size, cache_dir=True,
                  progress=progress and "activations (comply)").acts
    return {"pos": pos, "neg": neg, "pos_conf": [p.confidence for p in refuse],
            "neg_conf": [p.confidence for p in comply]}
