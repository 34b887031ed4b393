"""Targeted induction (notebook 06): a refusal direction (harmful refusals − neutral answers) added only where a topic
gate reads the remove topic; its strength searched on the validation prompts' first-token refusal score."""

from __future__ import annotations

from typing import Sequence

import torch

from crvlm_core.data.schema import Sample
from crvlm_core.methods.refusal_steering.directions import fit_directions
from crvlm_core.methods.refusal_steering.gate import TopicGate, best_topic_gate, steering_interventions
from crvlm_core.methods.refusal_steering.score import confident_activations, select_confident
from crvlm_core.methods.refusal_steering.search import EvalConfig, evaluate_condition
from crvlm_core.methods.refusal_steering.select import layer_scores, rank_layers
from crvlm_core.methods.refusal_steering.study import StudyConfig, score_topics
from crvlm_core.methods.refusal_steering.topics import TopicSplits
from crvlm_core.models.handle import ModelHandle

__all__ = ["induce_refusals", "search_induction_alpha"]


def search_induction_alpha(handle: ModelHandle, vectors: torch.Tensor, layers: Sequence[int], gate: TopicGate,
                           val: Sequence[Sample], config: StudyConfig) -> tuple[dict, list[dict]]:
    """Each of ``config.induce_alphas`` on the validation prompts (first-token refusal score): the row with the
    largest remove-minus-neutral refusal gap (ties: the smaller α) and every row."""
    ev = EvalConfig(config.judge, config.neutral, config.score_tokens, config.batch_size, mode="score",
                    cache_dir=config.eval_cache)
    base = evaluate_condition(handle, val, (), ev)
    search = []
    for a in config.induce_alphas:
        r = evaluate_condition(handle, val, steering_interventions(vectors, layers, a, "add", gate), ev,
                               unsteered=base)
        rr = r["refusal_rate_by_subject"]
        search.append({"alpha": a, "political": rr[config.remove], "neutral": rr[config.neutral],
                       "kl_neutral": r["kl_neutral"]})
    return max(search, key=lambda x: (x["political"] - x["neutral"], -x["alpha"])), search


def induce_refusals(handle: ModelHandle, splits: TopicSplits, test: Sequence[Sample], config: StudyConfig) -> dict:
    """Fit the induction direction (mean-diff of confident harmful refusals vs neutral answers, top layers), a gate
    "remove vs the rest" at the middle layer, search α, then generate and judge the remove and neutral test
    prompts. Returns the notebook's ``induction`` block (``skipped`` when too few confident examples)."""
    scored = score_topics(handle, splits, (config.keep, config.neutral), config)
    try:
        refuse, comply = select_confident(scored, config.tau, min_per_side=4)
    except ValueError as err:
        print("induction skipped:", err)
        return {"skipped": str(err)}
    acts = confident_activations(handle, refuse, comply, config.batch_size)
    vectors = fit_directions("mean-diff", acts["pos"], acts["neg"])
    layers = rank_layers(layer_scores("mean-diff", acts["pos"], acts["neg"]), config.n_layers_steer,
                         handle.n_layers // 4)
    gate_layer = handle.n_layers // 2
    gate = best_topic_gate(handle, splits.of("train", config.remove),
                           splits.of("train", config.neutral) + splits.of("train", config.keep), [gate_layer],
                           config.batch_size)
    val = [s for s in splits.val if s.subject in (config.remove, config.neutral)]
    best, search = search_induction_alpha(handle, vectors, layers, gate, val, config)
    test_ind = [s for s in test if s.subject in (config.remove, config.neutral)]
    gated = steering_interventions(vectors, layers, best["alpha"], "add", gate)
    gate_open = gated[0].gate(handle, [s.prompt for s in test_ind])
    base_t = evaluate_condition(handle, test_ind, (), config.test_eval())
    ind_t = evaluate_condition(handle, test_ind, gated, config.test_eval(), unsteered=base_t)
    subjects = (config.remove, config.neutral)
    return {"layers": layers, "gate_layer": gate_layer, "gate_train_accuracy": gate.accuracy, "alpha": best["alpha"],
            "alpha_search": search, "n_refuse": len(refuse), "n_comply": len(comply),
            "gate_open_rate": {s: sum(o for o, t in zip(gate_open, test_ind) if t.subject == s) /
                               max(1, sum(t.subject == s for t in test_ind)) for s in subjects},
            "unsteered": base_t["refusal_rate_by_subject"], "induced": ind_t["refusal_rate_by_subject"],
            "kl_neutral": ind_t["kl_neutral"], "unchanged_neutral": ind_t["unchanged_neutral"],
            "examples": [{"prompt": s.prompt, "unsteered": a, "induced": b}
                         for s, a, b in list(zip(test_ind, base_t["responses"], ind_t["responses"]))[:3]]}
