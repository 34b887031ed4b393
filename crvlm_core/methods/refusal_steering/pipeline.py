"""Refusal Steering (arXiv 2512.16602): judge-scored training data, per-layer mean-diff / rmd / wrmd vectors, layer
ranking, a strength search with early stopping, and removal of one topic's refusals (political) while another's
(harmful) are kept; also targeted induction (refuse one topic only) and the layer profile. CLI and notebook 06 call it.

Pipeline (:func:`fit_refusal_steering`)::

    data      refusal-topics = political 64 + neutral 64 + harmful 64, split per subject into train / val / test
    score     K sampled responses per train prompt (remove-topic and neutral), judge confidence c ∈ [−1, 1] each,
              mean over K; keep c ≥ τ as "refuse", c ≤ −τ as "comply"
    vectors   activations at the prompt's last token, every layer; mean-diff / rmd / wrmd per layer
    layers    2-fold cross-fitted AUC and d′ of the projection (refuse vs comply) per layer; steer the top-k
    λ         (rmd, wrmd) the relative ridge c in λ_l = c·tr(Σ_l)/d with the best cross-fitted d′ on the top layers
    α         h_l ← h_l − α·v_l at the chosen layers on every token; α grows until the validation objective
              stops improving (early stopping)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from crvlm_core.vectors import estimators as V
from crvlm_core.data.samples import Sample, fingerprint as data_fingerprint, load_dataset, split
from crvlm_core.extract import extract, read_last_token
from crvlm_core.core.io import atomic_write_json, cache_path, sha256_hex
from crvlm_core.judges.judges import Judge, aggregate_confidence, get_judge
from crvlm_core.metrics import kl_to_unsteered, rates_by, unchanged_prefix_fraction
from crvlm_core.models.loading import ModelHandle
from crvlm_core.core.paths import outputs_dir
from crvlm_core.steer.interventions import (AddVector, Intervention, ProjectOut, from_vector, intervention_fingerprint, refusal_score,
                    steered_generate, steered_logits)

__all__ = [
    "METHODS",
    "DATASET",
    "LAMBDA_GRID",
    "TopicSplits",
    "ScoredPrompt",
    "topic_splits",
    "check_topics",
    "cap_per_subject",
    "sample_responses",
    "score_prompts",
    "select_confident",
    "relative_lambda",
    "fit_directions",
    "layer_scores",
    "rank_layers",
    "choose_lambda",
    "steering_interventions",
    "evaluate_condition",
    "validation_objective",
    "search_alpha",
    "TopicGatedAdd",
    "best_topic_gate",
    "interventions_of",
    "TopicGate",
    "principal_directions_needed",
    "layer_profile",
    "RefusalSteeringFit",
    "fit_refusal_steering",
    "warm_up",
    "cli_fit",
    "cli_eval",
]

METHODS = ("mean-diff", "rmd", "wrmd")
"""Vector estimators of Refusal Steering (see :mod:`crvlm_core.vectors.estimators`)."""
DATASET = "refusal-topics"
"""Default data: political + neutral questions on the same countries, and harmful requests."""
LAMBDA_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Relative ridge values c tried for rmd / wrmd (λ_l = c · tr(Σ_l) / d, the mean eigenvalue of Σ_l)."""
ALPHA_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""Strengths tried in order by :func:`search_alpha` (in units of the mean-difference norm per layer)."""


# ------------------------------------------------------------------------------------------------ data


@dataclass
class TopicSplits:
    """Per-subject train / val / test samples (disjoint, seeded)."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def of(self, part: str, subject: str) -> list[Sample]:
        return [s for s in getattr(self, part) if s.subject == subject]


def topic_splits(samples: Sequence[Sample], n_val: int = 12, n_test: int = 24, seed: int = 42) -> TopicSplits:
    """Split per subject: ``n_test`` held out (the same ids whatever other subjects are present: the refusal
    organism is trained only on the rest), then ``n_val`` for the strength search, the rest for fitting."""
    rest, test = split(samples, n_test=n_test, seed=seed, stratify_by="subject")
    train, val = split(rest, n_test=n_val, seed=seed + 1, stratify_by="subject") if n_val else (rest, [])
    return TopicSplits(train, val, test)


def cap_per_subject(samples: Sequence[Sample], n: int) -> list[Sample]:
    """At most ``n`` samples of each subject, order kept."""
    counts: dict[str, int] = {}
    out = []
    for s in samples:
        counts[s.subject] = counts.get(s.subject, 0) + 1
        if counts[s.subject] <= n:
            out.append(s)
    return out


def check_topics(samples: Sequence[Sample], *topics: str) -> None:
    """Raise ``ValueError`` naming the available subjects if a topic is not a subject of ``samples``."""
    present = sorted({s.subject for s in samples})
    for t in topics:
        if t not in present:
            raise ValueError(f"unknown topic {t!r}: not a subject of the data; available subjects: {present}")
    if len(set(topics)) != len(topics):
        raise ValueError(f"topics must differ, got {list(topics)}")


def warm_up(handle: ModelHandle) -> None:
    """One tiny traced forward right after loading: nnsight reads a module's source at its first trace and keeps it,
    so later edits of the source file (several people share this tree) cannot desynchronise a long run."""
    steered_logits(handle, handle.build_inputs(["Hi"]), [AddVector(torch.zeros(handle.n_layers, handle.hidden_size),
                                                                   (0,), 0.0)], last_only=True)


def _cache_folder(kind: str) -> Path:
    return outputs_dir() / "cache" / kind


def _activation_cache(handle: ModelHandle) -> Path:
    """Where this model's (and organism adapter's) extracted activations are cached: extraction keys by the spec
    only, so an adapter needs its own folder."""
    return _cache_folder("activations") / sha256_hex(handle.key)[:12]


# --------------------------------------------------------------------------------------- judge scoring


@dataclass
class ScoredPrompt:
    """One prompt, its K responses and the judge's confidences (``confidence`` = mean over K, in [−1, 1])."""

    sample: Sample
    responses: list[str]
    confidences: list[float]

    @property
    def confidence(self) -> float:
        return aggregate_confidence(self.confidences)


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


def _judge_obj(judge: str | Judge) -> Judge:
    return get_judge(judge) if isinstance(judge, str) else judge


def _judge_key(judge: Judge) -> dict:
    """What identifies a judge's verdicts in a cache key: its name and, for a trained judge, its weights' digest."""
    return {"judge": getattr(judge, "name", str(judge)), "judge_fp": getattr(judge, "info", {}).get("fingerprint", "")}


def score_prompts(handle: ModelHandle, samples: Sequence[Sample], judge: str | Judge = "learned", k: int = 3,
                  max_new_tokens: int = 24, temperature: float = 0.7, seed: int = 0, batch_size: int = 8,
                  cache: bool = True, progress: bool = True) -> list[ScoredPrompt]:
    """Generate ``k`` responses per prompt and score each with the judge's confidence in [−1, 1].

    Judges without a graded confidence (the keyword rule) give ±1. Results are cached under
    ``outputs/cache/refusal_steering`` keyed by the model (and organism adapter), the data and every setting.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("score_prompts: no samples")
    j = _judge_obj(judge)
    key = sha256_hex(json.dumps({"model": handle.key, "data": data_fingerprint(samples), "k": k,
                                 "tokens": max_new_tokens, "t": temperature, "seed": seed, **_judge_key(j)},
                                sort_keys=True))[:20]
    path = _cache_folder("refusal_steering") / f"scores-{key}.json"
    if cache and path.exists():
        rows = json.loads(path.read_text())
        return [ScoredPrompt(s, r["responses"], r["confidences"]) for s, r in zip(samples, rows)]
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
    if cache:
        atomic_write_json(path, [{"id": p.sample.id, "responses": p.responses, "confidences": p.confidences}
                                 for p in scored])
    return scored


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


# -------------------------------------------------------------------------------------------- vectors


def relative_lambda(pos: torch.Tensor, neg: torch.Tensor, c: float) -> list[float]:
    """Per-layer ridge λ_l = c · tr(Σ_l) / d, with Σ_l the pooled within-class covariance (ML normaliser), i.e. ``c``
    times its mean eigenvalue: the same ``c`` means the same relative shrinkage at every layer."""
    c = float(c)
    if not math.isfinite(c) or c < 0:
        raise ValueError(f"the relative ridge c (λ = c·tr(Σ)/d) must be a finite number >= 0, got {c}")
    out = []
    n = pos.shape[0] + neg.shape[0]
    for layer in range(pos.shape[1]):
        xp, xn = pos[:, layer].double(), neg[:, layer].double()
        ss = ((xp - xp.mean(0)) ** 2).sum() + ((xn - xn.mean(0)) ** 2).sum()
        out.append(c * float(ss) / n / pos.shape[2])
    return out


def fit_directions(method: str, pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float] | None = None,
                   neg_conf: Sequence[float] | None = None, lam_rel: float = 1.0, lam: float | None = None) -> torch.Tensor:
    """Per-layer direction ``[n_layers, d]`` pointing towards refusal.

    ``mean-diff``: μ_refuse − μ_comply. ``rmd``: (Σ + λ_l I)⁻¹(μ_refuse − μ_comply) (:func:`crvlm_core.vectors.estimators.rmd`).
    ``wrmd``: the same with every sample weighted by |judge confidence| (:func:`crvlm_core.vectors.estimators.wrmd`). The ridge
    directions are rescaled per layer to the mean-difference norm. ``lam`` (absolute, every layer) overrides
    ``lam_rel`` (relative: λ_l = lam_rel · tr(Σ_l)/d).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mean-diff":
        return V.mean_diff(pos, neg)
    if method == "wrmd" and (pos_conf is None or neg_conf is None):
        raise ValueError("wrmd needs the judge confidences of both sides (pos_conf, neg_conf)")
    lams = [V._check_lam(lam)] * pos.shape[1] if lam is not None else relative_lambda(pos, neg, lam_rel)
    out = []
    for layer, lam_l in enumerate(lams):
        p, n = pos[:, layer:layer + 1], neg[:, layer:layer + 1]
        if method == "rmd":
            out.append(V.rmd(p, n, lam_l))
        else:
            out.append(V.wrmd(p, n, torch.as_tensor(pos_conf), torch.as_tensor(neg_conf), lam_l))
    return torch.cat(out)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a random pos > score of a random neg), ties count ½."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _dprime(pos: np.ndarray, neg: np.ndarray) -> float:
    var = (pos.var() * len(pos) + neg.var() * len(neg)) / max(len(pos) + len(neg), 1)
    return float((pos.mean() - neg.mean()) / math.sqrt(max(var, 1e-30)))


def _folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), k)


def layer_scores(method: str, pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float] | None = None,
                 neg_conf: Sequence[float] | None = None, lam_rel: float = 1.0, folds: int = 2,
                 seed: int = 0) -> dict[str, list[float]]:
    """How well the projection on each layer's direction separates refusals from compliance, cross-fitted.

    Both classes are cut into ``folds`` seeded folds; the direction is fitted without fold f and the held-out
    samples of fold f are projected on it. Per layer: ``auc`` (held-out AUC of the projection), ``dprime``
    ((mean_refuse − mean_comply)/pooled sd of the held-out projections, averaged over folds) and ``corr``
    (Pearson correlation of the held-out projection with the judge confidence; ±1 labels when none are given).
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    n_p, n_n = pos.shape[0], neg.shape[0]
    if min(n_p, n_n) < folds:
        raise ValueError(f"cross-fitting needs >= {folds} samples per side, got {n_p} refusals / {n_n} compliant")
    cp = np.asarray(pos_conf if pos_conf is not None else np.ones(n_p), dtype=np.float64)
    cn = np.asarray(neg_conf if neg_conf is not None else -np.ones(n_n), dtype=np.float64)
    rng = np.random.default_rng(seed)
    fp, fn = _folds(n_p, folds, rng), _folds(n_n, folds, rng)
    n_layers = pos.shape[1]
    proj_p, proj_n = np.zeros((n_p, n_layers)), np.zeros((n_n, n_layers))
    dps = []
    for f in range(folds):
        tp = np.setdiff1d(np.arange(n_p), fp[f])
        tn = np.setdiff1d(np.arange(n_n), fn[f])
        v = fit_directions(method, pos[tp], neg[tn], cp[tp], cn[tn], lam_rel=lam_rel).double()
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        hp = torch.einsum("nld,ld->nl", pos[fp[f]].double(), v).numpy()
        hn = torch.einsum("nld,ld->nl", neg[fn[f]].double(), v).numpy()
        proj_p[fp[f]], proj_n[fn[f]] = hp, hn
        dps.append([_dprime(hp[:, l], hn[:, l]) for l in range(n_layers)])
    conf = np.concatenate([cp, cn])
    auc, corr = [], []
    for l in range(n_layers):
        auc.append(_auc(proj_p[:, l], proj_n[:, l]))
        x = np.concatenate([proj_p[:, l], proj_n[:, l]])
        corr.append(float(np.corrcoef(x, conf)[0, 1]) if x.std() > 0 and conf.std() > 0 else 0.0)
    return {"auc": auc, "dprime": list(np.mean(dps, axis=0)), "corr": corr}


def rank_layers(scores: dict[str, list[float]], k: int | None = None, min_layer: int = 0) -> list[int]:
    """Layers ordered best first by held-out AUC, ties broken by d′ (AUC saturates at 1 on separable data);
    only layers ≥ ``min_layer``; the first ``k`` if given."""
    n = len(scores["auc"])
    order = sorted(range(min_layer, n), key=lambda l: (-round(scores["auc"][l], 6), -scores["dprime"][l], l))
    return order[:k] if k is not None else order


def choose_lambda(method: str, pos: torch.Tensor, neg: torch.Tensor, layers: Sequence[int],
                  pos_conf: Sequence[float] | None = None, neg_conf: Sequence[float] | None = None,
                  grid: Sequence[float] = LAMBDA_GRID, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The relative ridge ``c`` (λ_l = c·tr(Σ_l)/d) with the best cross-fitted d′ averaged over ``layers``.

    Returns ``(best c, {c: mean d′})``. Only ``rmd`` / ``wrmd`` have a λ.
    """
    if method == "mean-diff":
        raise ValueError("mean-diff has no ridge λ to choose")
    if not grid:
        raise ValueError("empty λ grid")
    layers = list(layers)
    sub_p, sub_n = pos[:, layers], neg[:, layers]
    table = {}
    for c in grid:
        s = layer_scores(method, sub_p, sub_n, pos_conf, neg_conf, lam_rel=c, seed=seed)
        table[float(c)] = float(np.mean(s["dprime"]))
    best = max(table, key=lambda c: (table[c], c))
    return best, table


# ---------------------------------------------------------------------------------- application / eval


def steering_interventions(directions: torch.Tensor, layers: Sequence[int], alpha: float,
                           operation: str = "subtract", gate: "TopicGate | None" = None) -> list[Intervention]:
    """``subtract``: h_l ← h_l − α·v_l; ``project_out``: h_l ← h_l − α·(h_l·v̂_l)v̂_l; ``add``: h_l + α·v_l (induction).
    Applied at ``layers`` on every token (prompt and generated), batched (:mod:`crvlm_core.steer.interventions`). With a ``gate``
    (``subtract`` / ``add`` only), only the prompts the topic gate selects are steered (:class:`TopicGatedAdd`)."""
    layers = tuple(int(l) for l in layers)
    if gate is not None:
        if operation not in ("subtract", "add"):
            raise ValueError(f"a topic gate works with subtract or add, not {operation!r}")
        signed = -float(alpha) if operation == "subtract" else float(alpha)
        return [TopicGatedAdd(directions, layers, signed, gate.layer, gate.direction, gate.threshold)]
    if operation == "subtract":
        return [AddVector(directions, layers, -float(alpha))]
    if operation == "add":
        return [AddVector(directions, layers, float(alpha))]
    if operation == "project_out":
        return [ProjectOut(directions, layers, float(alpha))]
    raise ValueError(f"unknown operation {operation!r}; choose subtract, project_out or add")


def _neutral_logits(handle: ModelHandle, prompts: Sequence[str], interventions: Sequence[Intervention],
                    batch_size: int):
    """``(logits [b, seq, vocab], attention mask)`` per batch of the neutral prompts, one batch at a time."""
    for i in range(0, len(prompts), batch_size):
        enc = handle.build_inputs(prompts[i:i + batch_size])
        yield steered_logits(handle, enc, interventions), enc["attention_mask"].cpu()


def evaluate_condition(handle: ModelHandle, samples: Sequence[Sample], interventions: Sequence[Intervention] = (),
                       judge: str | Judge = "learned", neutral: str = "neutral", max_new_tokens: int = 24,
                       batch_size: int = 8, unsteered: dict | None = None, progress: bool = False,
                       mode: str = "generate", cache_dir: str | Path | None = None) -> dict:
    """Generate (steered), judge, and measure the change on the neutral prompts.

    ``mode="score"`` replaces generation + judge by the first-token refusal score (one forward per batch,
    :func:`crvlm_core.steer.interventions.refusal_score`; refused = log-odds > 0): ~10× cheaper, used for the strength search
    on CPU; responses are then empty and ``unchanged_neutral`` is NaN.

    Returns ``refusal_rate_by_subject``, ``responses``, ``refused``; without ``unsteered`` (the reference) the
    neutral prompts' logits (``_logits``, kept for later comparisons); and when ``unsteered`` (this function's
    result without interventions) is given, ``kl_neutral`` (mean KL(P_unsteered ‖ P_steered) over every token of
    the chat-formatted neutral prompts, the first answer token's distribution included) and ``unchanged_neutral``
    (fraction of neutral answers whose first 20 tokens are unchanged).

    ``cache_dir``: when given, the result is saved there under a key made of the model (and organism adapter), the
    samples, the interventions' fingerprint, the judge, every setting and the reference's answers, and an unchanged
    call returns it without running the model. A cached reference carries no logits; a steered call that is not
    cached recomputes them once (one unsteered forward over the neutral prompts) and keeps them in the reference.
    """
    if mode not in ("generate", "score"):
        raise ValueError(f"mode must be 'generate' or 'score', got {mode!r}")
    samples = list(samples)
    if not samples:
        raise ValueError("evaluate_condition: no samples (empty split)")
    prompts = [s.prompt for s in samples]
    j = _judge_obj(judge) if mode == "generate" else None  # the score mode judges nothing
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_path(cache_dir, "condition", {
            "model": handle.key, "samples": [[s.id, s.prompt, s.subject] for s in samples],
            "interventions": intervention_fingerprint(list(interventions)), "neutral": neutral, "mode": mode,
            "judge": _judge_key(j) if j is not None else None,
            "max_new_tokens": max_new_tokens if mode == "generate" else None, "batch_size": batch_size,
            "reference": None if unsteered is None else sha256_hex(json.dumps([unsteered["responses"],
                                                                               unsteered["refused"]]))})
        if cache_file.exists():
            return json.loads(cache_file.read_text())
    if mode == "score":
        responses = []
        refused = [bool(x > 0) for x in refusal_score(handle, prompts, interventions, batch_size=batch_size)]
    else:
        responses = steered_generate(handle, prompts, interventions, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress)
        refused = [v.refused for v in j.judge(prompts, responses)]
    res = {"refusal_rate_by_subject": rates_by(refused, [s.subject for s in samples]), "responses": responses,
           "refused": refused, "n_by_subject": {k: sum(s.subject == k for s in samples)
                                                for k in sorted({s.subject for s in samples})}}
    neutral_idx = [i for i, s in enumerate(samples) if s.subject == neutral]
    neutral_prompts = [prompts[i] for i in neutral_idx]
    batches = _neutral_logits(handle, neutral_prompts, interventions, batch_size)
    if unsteered is not None:
        if "_logits" not in unsteered:  # a reference read from the cache
            unsteered["_logits"] = list(_neutral_logits(handle, neutral_prompts, (), batch_size))
        # compared batch by batch and dropped: full-vocabulary logits of every position are large (151 936 floats
        # per token on Qwen), so only the unsteered reference keeps them
        kls, weights = [], []
        for (ls, m), (lu, _) in zip(batches, unsteered["_logits"]):
            kls.append(kl_to_unsteered(ls, lu, m.bool()))
            weights.append(int(m.sum()))
        res["kl_neutral"] = float(np.average(kls, weights=weights)) if kls else float("nan")
        res["unchanged_neutral"] = unchanged_prefix_fraction([responses[i] for i in neutral_idx],
                                                             [unsteered["responses"][i] for i in neutral_idx],
                                                             handle.tokenizer) if neutral_idx and responses else float("nan")
    else:
        res["_logits"] = list(batches)
        res["kl_neutral"], res["unchanged_neutral"] = 0.0, 1.0
    if cache_file is not None:
        atomic_write_json(cache_file, {k: v for k, v in res.items() if not k.startswith("_")})
    return res


def validation_objective(rates: dict[str, float], base: dict[str, float], kl: float, remove: str, keep: str,
                         keep_tolerance: float = 0.05, keep_weight: float = 2.0, kl_weight: float = 1.0) -> float:
    """Lower is better: ``rate(remove) + keep_weight·max(0, base(keep) − rate(keep) − tol) + kl_weight·KL``."""
    drop = max(0.0, base[keep] - rates[keep] - keep_tolerance)
    return float(rates[remove] + keep_weight * drop + kl_weight * kl)


def search_alpha(handle: ModelHandle, directions: torch.Tensor, layers: Sequence[int], val: Sequence[Sample],
                 remove: str, keep: str, neutral: str = "neutral", alphas: Sequence[float] = ALPHA_GRID,
                 operation: str = "subtract", patience: int = 2, judge: str | Judge = "learned",
                 max_new_tokens: int = 20, batch_size: int = 8, baseline: dict | None = None,
                 objective_kw: dict | None = None, progress: Callable[[dict], None] | None = None,
                 mode: str = "generate", refine: int = 2, gate: "TopicGate | None" = None,
                 cache_dir: str | Path | None = None) -> tuple[float, list[dict]]:
    """Try strengths in increasing order on the validation prompts and keep the one with the lowest
    :func:`validation_objective`. Early stopping: stop after ``patience`` strengths without improvement, or as
    soon as the remove-topic refusal rate reaches 0 (a larger α can then only raise the KL and lower the kept
    refusals). Then ``refine`` bisection steps between the best strength and the next larger one tried (which
    overshot or did not help), so a grid that starts too strong still finds a useful α. ``mode``: ``"generate"``
    (default; generation + judge) or ``"score"`` (first-token refusal score with the fixed rule log-odds > 0, ~10×
    cheaper; on Qwen2.5-0.5B that rule called none of the refused harmful validation prompts a refusal, so the
    search could not see the harmful refusals it must keep). ``cache_dir``: each evaluation is cached there
    (:func:`evaluate_condition`), so a repeated search runs no model.

    Returns:
        ``(best α, rows)``, one row per tried α (rates, KL, unchanged fraction, objective).
    """
    alphas = sorted(float(a) for a in alphas)
    if not alphas or alphas[0] <= 0:
        raise ValueError(f"alphas must be positive, got {alphas}")
    kw = dict(objective_kw or {})
    baseline = baseline or evaluate_condition(handle, val, (), judge, neutral, max_new_tokens, batch_size, mode=mode,
                                              cache_dir=cache_dir)
    base = baseline["refusal_rate_by_subject"]
    rows: list[dict] = []

    def trial(a: float) -> tuple[float, dict]:
        ivs = steering_interventions(directions, layers, a, operation, gate)
        r = evaluate_condition(handle, val, ivs, judge, neutral, max_new_tokens, batch_size, unsteered=baseline,
                               mode=mode, cache_dir=cache_dir)
        j = validation_objective(r["refusal_rate_by_subject"], base, r["kl_neutral"], remove, keep, **kw)
        row = {"alpha": a, **{f"rate_{k}": v for k, v in r["refusal_rate_by_subject"].items()},
               "kl_neutral": r["kl_neutral"], "objective": j}
        if r["responses"]:
            row["unchanged_neutral"] = r["unchanged_neutral"]
        rows.append(row)
        if progress:
            progress(row)
        return j, r

    best, best_j, since = 0.0, validation_objective(base, base, 0.0, remove, keep, **kw), 0
    for a in alphas:
        j, r = trial(a)
        if j < best_j - 1e-9:
            best, best_j, since = a, j, 0
        else:
            since += 1
        if since >= patience or r["refusal_rate_by_subject"][remove] == 0.0:
            break
    # refine: bisect between the best strength and the first larger one tried (it overshot or did not help)
    larger = [row["alpha"] for row in rows if row["alpha"] > best]
    hi = min(larger) if larger else None
    for _ in range(refine if hi is not None else 0):
        mid = (best + hi) / 2
        j, _ = trial(mid)
        if j < best_j - 1e-9:
            best, best_j = mid, j
        else:
            hi = mid
    return best, rows


# ------------------------------------------------------------------------------------- targeted induction


class TopicGatedAdd(Intervention):
    """Targeted induction: ``h_l ← h_l + α·v_l`` at ``layers``, only for prompts the topic gate selects.

    The gate reads the unsteered prompt's last-token state at ``gate_layer`` (one extra forward per batch, in
    :meth:`prepare`) and opens a row when its projection on ``gate_direction`` exceeds ``threshold``.
    """

    def __init__(self, vectors: torch.Tensor, layers: Sequence[int], alpha: float, gate_layer: int,
                 gate_direction: torch.Tensor, threshold: float):
        self.vectors = vectors.detach().float()
        self.layers = tuple(int(l) for l in layers)
        self.alpha, self.gate_layer, self.threshold = float(alpha), int(gate_layer), float(threshold)
        g = gate_direction.detach().float().flatten()
        self.gate_direction = g / g.norm().clamp_min(1e-12)
        self._mask: torch.Tensor | None = None

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        handle.check_layer(self.gate_layer)

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        h = read_last_token(handle, enc, [self.gate_layer])[:, 0].float()
        self._mask = ((h @ self.gate_direction) > self.threshold).float()

    def release(self) -> None:
        self._mask = None

    def gate(self, handle: ModelHandle, prompts: Sequence[str]) -> list[bool]:
        """Which prompts the gate selects (for reporting)."""
        self.prepare(handle, handle.build_inputs(list(prompts)))
        out = [bool(x) for x in self._mask]
        self.release()
        return out

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._mask is None:
            raise RuntimeError("TopicGatedAdd.apply called outside prepare/release (use steered_generate)")
        m = self._mask.to(hidden.device, hidden.dtype)[:, None, None]
        return hidden + m * self.alpha * self.vectors[layer].to(hidden.device, hidden.dtype)


def _mean_diff_gate(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean difference ``a − b`` of two sets of states ``[n, d]``, the threshold halfway between the two classes'
    mean projections on it, and the training accuracy of ``projection > threshold ⇔ a``."""
    d = (a.double().mean(0) - b.double().mean(0))
    u = d / d.norm().clamp_min(1e-30)
    pa, pb = a.double() @ u, b.double() @ u
    thr = float((pa.mean() + pb.mean()) / 2)
    acc = float(((pa > thr).sum() + (pb <= thr).sum()) / (len(pa) + len(pb)))
    return d.float(), thr, acc


@dataclass
class TopicGate:
    """Where a topic gate reads (``layer``), its direction and threshold, and its training accuracy."""

    layer: int
    direction: torch.Tensor
    threshold: float
    accuracy: float

    def to_json(self) -> dict:
        return {"layer": self.layer, "threshold": self.threshold, "accuracy": self.accuracy,
                "direction": [float(x) for x in self.direction]}

    @classmethod
    def from_json(cls, d: dict) -> "TopicGate":
        return cls(int(d["layer"]), torch.tensor(d["direction"], dtype=torch.float32), float(d["threshold"]),
                   float(d.get("accuracy", float("nan"))))


def best_topic_gate(handle: ModelHandle, topic: Sequence[Sample], others: Sequence[Sample],
                    layers: Sequence[int] | None = None, batch_size: int = 8, cache: bool = True) -> TopicGate:
    """The mean-difference topic gate (topic − others) at the candidate layer where it separates the training
    prompts best (ties: the earlier layer). One forward per batch reads every candidate layer. Default candidates:
    every layer from a quarter of the way up. ``cache``: the activations are cached per model and organism adapter,
    like :func:`confident_activations`."""
    if not topic or not others:
        raise ValueError("a topic gate needs samples of the topic and of other subjects")
    layers = sorted({handle.check_layer(int(l)) for l in (layers if layers is not None
                                                           else range(handle.n_layers // 4, handle.n_layers))})
    folder = _activation_cache(handle) if cache else False
    a = extract(handle, list(topic), layers=layers, batch_size=batch_size, cache=folder, progress=False).acts
    b = extract(handle, list(others), layers=layers, batch_size=batch_size, cache=folder, progress=False).acts
    best = None
    for i, layer in enumerate(layers):
        d, thr, acc = _mean_diff_gate(a[:, i], b[:, i])
        if best is None or acc > best.accuracy + 1e-12:
            best = TopicGate(layer, d, thr, acc)
    return best


# --------------------------------------------------------------------------------------- layer profile


def principal_directions_needed(pos: torch.Tensor, neg: torch.Tensor, frac: float = 0.9) -> list[int]:
    """Per layer: how many principal directions of the activations (both classes pooled and centred on their
    common mean) are needed to carry ``frac`` of the squared norm of the mean difference μ_refuse − μ_comply.

    1 means refusal is the dominant direction of variation at that layer; large numbers mean the refusal signal
    is spread over many directions that also carry other variation (the paper's finding for deeper layers).
    """
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    out = []
    for layer in range(pos.shape[1]):
        xp, xn = pos[:, layer].double(), neg[:, layer].double()
        delta = xp.mean(0) - xn.mean(0)
        pooled = torch.cat([xp, xn])
        _, s, vh = torch.linalg.svd(pooled - pooled.mean(0), full_matrices=False)
        keep = s > s.max() * 1e-10
        coef = (vh[keep] @ delta) ** 2  # energy of δ along each PC, by decreasing variance
        cum = torch.cumsum(coef, 0) / max(float(delta @ delta), 1e-30)
        hit = torch.nonzero(cum >= frac - 1e-9)
        out.append(int(hit[0]) + 1 if len(hit) else int(keep.sum()))
    return out


def layer_profile(pos: torch.Tensor, neg: torch.Tensor, pos_conf: Sequence[float], neg_conf: Sequence[float],
                  lam_rel: dict[str, float], seed: int = 0) -> dict:
    """Per layer and method: cross-fitted AUC / d′ / correlation, the mean-difference norm, and the number of
    principal directions (of the pooled activations) carrying 90 % of the mean difference."""
    prof: dict = {"layer": list(range(pos.shape[1])),
                  "mean_diff_norm": [float(x) for x in V.mean_diff(pos, neg).norm(dim=-1)],
                  "pcs_for_90pct": principal_directions_needed(pos, neg, 0.9)}
    for m in METHODS:
        s = layer_scores(m, pos, neg, pos_conf, neg_conf, lam_rel=lam_rel.get(m, 1.0), seed=seed)
        for k, v in s.items():
            prof[f"{m}_{k}"] = [float(x) for x in v]
    return prof


# ------------------------------------------------------------------------------------------ the pipeline


@dataclass
class RefusalSteeringFit:
    """What :func:`fit_refusal_steering` found for one method."""

    vector: V.SteeringVector
    layer_scores: dict
    alpha_rows: list[dict]
    lambda_table: dict = field(default_factory=dict)


def fit_refusal_steering(handle: ModelHandle, method: str = "rmd", remove: str = "political", keep: str = "harmful",
                         neutral: str = "neutral", samples: Sequence[Sample] | None = None,
                         splits: TopicSplits | None = None, judge: str | Judge = "learned", k: int = 3,
                         tau: float = 0.5, score_tokens: int = 24, n_layers_steer: int = 3, min_layer: int | None = None,
                         lam_rel: float | None = None, alphas: Sequence[float] = ALPHA_GRID,
                         operation: str = "subtract", val_tokens: int = 20, batch_size: int = 8, seed: int = 0,
                         scored: list[ScoredPrompt] | None = None, acts: dict | None = None,
                         baseline_val: dict | None = None, search_by: str = "generate", progress: bool = True,
                         log: Callable[[str], None] = print, gate: bool | TopicGate = False,
                         cache_dir: str | Path | None = None) -> RefusalSteeringFit:
    """The whole fitting path for one method: score → confident sets → activations → layer ranking → λ → α.

    ``gate``: steer only the prompts a topic gate puts on the ``remove`` side of "``remove`` vs ``keep``" (fitted on
    the training prompts of both, at the layer that separates them best; or a given :class:`TopicGate`), so the
    refusals to keep are left alone even where the refusal direction is shared. Saved in the vector's
    ``extra["gate"]``; :func:`interventions_of` rebuilds it.

    ``scored``, ``acts`` (``{"pos", "neg", "pos_conf", "neg_conf"}``) and ``baseline_val`` can be passed in to share
    the expensive steps between methods (the notebook does). ``cache_dir``: the strength search's evaluations are
    cached there (:func:`evaluate_condition`); scores and activations are always cached. Returns the saved-format vector (operation ``add``
    with a negative α for subtraction, or ``project_out``) and the search logs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if lam_rel is not None and (not math.isfinite(lam_rel) or lam_rel < 0):
        raise ValueError(f"λ must be >= 0, got {lam_rel}")
    samples = list(samples) if samples is not None else load_dataset(DATASET)
    check_topics(samples, remove, keep, neutral)
    splits = splits or topic_splits(samples)
    if scored is None:
        fit_samples = splits.of("train", remove) + splits.of("train", neutral)
        scored = score_prompts(handle, fit_samples, judge, k, score_tokens, seed=seed, batch_size=batch_size,
                               progress=progress)
    refuse, comply = select_confident(scored, tau, min_per_side=2)  # 2-fold cross-fitting needs 2 per side
    log(f"[{method}] confident: {len(refuse)} refusals, {len(comply)} compliant (τ={tau}, {len(scored)} scored)")
    if acts is None:
        acts = confident_activations(handle, refuse, comply, batch_size, progress)
    pos, neg, pc, nc = acts["pos"], acts["neg"], acts["pos_conf"], acts["neg_conf"]
    min_layer = handle.n_layers // 4 if min_layer is None else min_layer
    lam_table: dict = {}
    if method != "mean-diff" and lam_rel is None:
        pre = rank_layers(layer_scores("mean-diff", pos, neg, seed=seed), n_layers_steer, min_layer)
        lam_rel, lam_table = choose_lambda(method, pos, neg, pre, pc, nc, seed=seed)
        log(f"[{method}] λ/mean-eigenvalue chosen {lam_rel} (cross-fitted d′ {lam_table})")
    scores = layer_scores(method, pos, neg, pc, nc, lam_rel=lam_rel or 0.0, seed=seed)
    layers = rank_layers(scores, n_layers_steer, min_layer)
    log(f"[{method}] steering layers {layers} (held-out AUC {[round(scores['auc'][l], 3) for l in layers]})")
    directions = fit_directions(method, pos, neg, pc, nc, lam_rel=lam_rel or 0.0)
    if gate is True:
        gate = best_topic_gate(handle, splits.of("train", remove), splits.of("train", keep), batch_size=batch_size)
        log(f"[{method}] topic gate {remove} vs {keep} at layer {gate.layer} (training accuracy {gate.accuracy:.3f})")
    gate = gate or None
    alpha, rows = search_alpha(handle, directions, layers, splits.val, remove, keep, neutral, alphas, operation,
                               judge=judge, max_new_tokens=val_tokens, batch_size=batch_size, baseline=baseline_val,
                               mode=search_by, gate=gate, cache_dir=cache_dir,
                               progress=lambda r: log(f"[{method}] α={r['alpha']}: " + ", ".join(
                                   f"{k}={v:.3f}" for k, v in r.items() if k != "alpha")))
    signed = -alpha if operation == "subtract" and alpha else alpha
    vector = V.SteeringVector(
        directions=directions, method=method, layers=layers,
        operation="project_out" if operation == "project_out" else "add", alpha=signed, positions="last",
        model_spec=handle.spec, fingerprint=sha256_hex(handle.key, data_fingerprint(
            [p.sample for p in refuse + comply]))[:20],
        extra={"kind": "refusal-steering", "remove": remove, "keep": keep, "neutral": neutral,
               "lambda_rel": lam_rel if method != "mean-diff" else None, "tau": tau, "k": k,
               "judge": getattr(_judge_obj(judge), "name", str(judge)), "n_refuse": len(refuse),
               "n_comply": len(comply), "operation": operation, "alpha_search": rows, "search_by": search_by,
               "layer_auc": scores["auc"], "layer_dprime": scores["dprime"], "model_key": handle.key,
               **({"gate": gate.to_json()} if gate is not None else {})})
    return RefusalSteeringFit(vector, scores, rows, lam_table)


def interventions_of(vector: V.SteeringVector, alpha: float | None = None,
                     layers: Sequence[int] | None = None) -> list[Intervention]:
    """The interventions of a saved vector: a topic-gated one when it carries ``extra["gate"]`` (a gated
    Refusal Steering fit), else :func:`crvlm_core.steer.interventions.from_vector`."""
    gate = (vector.extra or {}).get("gate")
    if gate is None:
        return [from_vector(vector, alpha=alpha, layers=layers)]
    g = TopicGate.from_json(gate)
    return [TopicGatedAdd(vector.directions, tuple(layers) if layers is not None else tuple(vector.layers),
                          float(vector.alpha if alpha is None else alpha), g.layer, g.direction, g.threshold)]


def confident_activations(handle: ModelHandle, refuse: Sequence[ScoredPrompt], comply: Sequence[ScoredPrompt],
                          batch_size: int = 8, progress: bool = True) -> dict:
    """Last-prompt-token states at every layer of the confident refusals and compliances, with their confidences
    (cached per model and organism adapter)."""
    folder = _activation_cache(handle)
    pos = extract(handle, [p.sample for p in refuse], batch_size=batch_size, cache=folder, progress=progress,
                  desc="activations (refuse)").acts
    neg = extract(handle, [p.sample for p in comply], batch_size=batch_size, cache=folder, progress=progress,
                  desc="activations (comply)").acts
    return {"pos": pos, "neg": neg, "pos_conf": [p.confidence for p in refuse],
            "neg_conf": [p.confidence for p in comply]}


def summary_row(name: str, res: dict) -> dict:
    """One metrics row of an evaluated condition (no responses, no logits)."""
    return {"condition": name, **{f"refusal_{k}": v for k, v in res["refusal_rate_by_subject"].items()},
            "kl_neutral": res["kl_neutral"], "unchanged_neutral": res["unchanged_neutral"]}


def dump_fit(fit: RefusalSteeringFit) -> dict:
    """JSON-able summary of a fit (layers, α, λ, search rows)."""
    v = fit.vector
    return {"method": v.method, "layers": v.layers, "alpha": v.alpha, "operation": v.operation,
            "lambda_rel": v.extra.get("lambda_rel"), "lambda_table": {str(k): x for k, x in fit.lambda_table.items()},
            "alpha_search": fit.alpha_rows, "n_refuse": v.extra["n_refuse"], "n_comply": v.extra["n_comply"]}


# ------------------------------------------------------------------------------------------------- CLI


def cli_fit(args) -> int:
    """``crvlm fit --method {mean-diff,rmd,wrmd} --remove TOPIC --keep TOPIC [--train DATA] --out DIR``: fit, choose
    layers / λ / α on the data's train and val splits, save the vector and ``fit.json`` in DIR."""
    from crvlm_core.cli.main import FIT_JSON
    from crvlm_core.models.loading import load_model

    if args.method not in METHODS:
        raise SystemExit(f"crvlm fit --remove: --method must be one of {', '.join(METHODS)}, got {args.method!r}")
    samples = load_dataset(DATASET if args.train in (None, "mmlu") else args.train)  # mmlu: the scope default
    try:
        check_topics(samples, args.remove, args.keep, args.neutral)
    except ValueError as err:
        raise SystemExit(f"crvlm fit: {err}") from None
    handle = load_model(args.model)
    warm_up(handle)
    out = Path(args.out)
    start = time.perf_counter()
    splits = topic_splits(samples, n_val=args.n_val, n_test=args.n_holdout, seed=args.seed)
    splits.train = cap_per_subject(splits.train, args.n_train)  # --n-train: prompts per subject scored
    fit = fit_refusal_steering(handle, args.method, args.remove, args.keep, args.neutral, samples, splits,
                               judge=args.score_judge, k=args.k, tau=args.tau, n_layers_steer=args.n_layers_steer,
                               operation=args.operation, batch_size=args.batch_size, search_by=args.search_by,
                               gate=bool(args.gate),
                               lam_rel=args.ridge_lambda_rel)
    fit.vector.save(out)
    v = fit.vector
    summary = {"kind": "refusal-steering", "model": args.model, "method": args.method, "layers": v.layers,
               "alpha": v.alpha, "operation": v.operation, "remove": args.remove, "keep": args.keep,
               "neutral": args.neutral, "in_scope": [args.remove, args.neutral], "out_scope": [args.keep],
               "train": DATASET if args.train in (None, "mmlu") else args.train, "seed": args.seed, "n_val": args.n_val, "n_holdout": args.n_holdout,
               "lambda_rel": v.extra.get("lambda_rel"), "n_refuse": v.extra["n_refuse"],
               "n_comply": v.extra["n_comply"], "gate": {k: g for k, g in v.extra["gate"].items() if k != "direction"}
               if "gate" in v.extra else None, "fit_seconds": time.perf_counter() - start,
               "fingerprint": v.fingerprint, "model_key": handle.key}
    atomic_write_json(out / FIT_JSON, summary)
    print(f"[fit] {args.method} removing {args.remove} refusals (keeping {args.keep}) on {args.model}: layers "
          f"{v.layers}, α {v.alpha:+.2f}, λ/mean-eig {summary['lambda_rel']}, {summary['fit_seconds']:.0f} s → {out}")
    return 0


def cli_eval(args, fit: dict) -> int:
    """``crvlm eval --artifact DIR --test DATA``: unsteered and steered refusal rates per subject on the held-out split
    of the fit (same seed and sizes), KL and unchanged-answer fraction on the neutral prompts → ``metrics.json``."""
    from crvlm_core.cli.main import _write_outputs, load_interventions, parse_layers
    from crvlm_core.models.loading import load_model

    samples = load_dataset(args.test)
    try:
        check_topics(samples, fit["remove"], fit["keep"], fit["neutral"])
    except ValueError as err:
        raise SystemExit(f"crvlm eval: {err} (use --test {DATASET} or a JSONL with these subjects)") from None
    seed = args.seed if args.seed is not None else fit.get("seed", 42)
    if args.split == "all":
        test = samples
    else:
        sp = topic_splits(samples, n_val=fit.get("n_val", 12), n_test=fit.get("n_holdout", 24), seed=seed)
        test = sp.test if args.split == "test" else sp.train + sp.val
    if args.n_test is not None:
        test = cap_per_subject(test, args.n_test)
    handle = load_model(args.model or fit["model"])
    warm_up(handle)
    ivs = load_interventions(Path(args.artifact), handle, args.alpha, parse_layers(args.layers))
    kw = dict(judge=args.judge, neutral=fit["neutral"], max_new_tokens=args.max_new_tokens,
              batch_size=args.batch_size, progress=True)
    base = evaluate_condition(handle, test, (), **kw)
    steered = evaluate_condition(handle, test, ivs, unsteered=base, **kw)
    metrics = {"kind": "refusal-steering", "model": handle.spec, "method": fit["method"],
               "artifact": str(args.artifact), "test": args.test, "split": args.split, "judge": args.judge,
               "layers": list(ivs[0].layers), "alpha": getattr(ivs[0], "alpha", None),
               "refusal_rate_by_subject": steered["refusal_rate_by_subject"],
               "unsteered_refusal_rate_by_subject": base["refusal_rate_by_subject"],
               "n_by_subject": steered["n_by_subject"], "kl_neutral": steered["kl_neutral"],
               "unchanged_neutral": steered["unchanged_neutral"], "max_new_tokens": args.max_new_tokens}
    rows = [{"id": s.id, "subject": s.subject, "response": r, "refused": bool(f), "unsteered_response": ru,
             "unsteered_refused": bool(fu)}
            for s, r, f, ru, fu in zip(test, steered["responses"], steered["refused"], base["responses"],
                                       base["refused"])]
    _write_outputs(Path(args.out), metrics, rows)
    rates = ", ".join(f"{k} {v:.2f} (was {base['refusal_rate_by_subject'][k]:.2f})"
                      for k, v in steered["refusal_rate_by_subject"].items())
    print(f"[eval] {fit['method']} on {handle.spec}: refusals {rates}; KL neutral {steered['kl_neutral']:.3f}, "
          f"unchanged {steered['unchanged_neutral']:.2f} → {args.out}")
    return 0
