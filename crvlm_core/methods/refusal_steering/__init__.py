"""Refusal Steering (arXiv 2512.16602): judge-scored data (score), per-layer mean-diff / rmd / wrmd vectors
(directions), layer ranking and λ (select), topic gate (gate), strength search (search), the fit and its artifact
(fit, artifact), and notebook 06's study (study, induce). Library code imports from those modules, not from here.

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

from crvlm_core.methods.refusal_steering.artifact import KIND, load_refusal_steering, read_refusal_steering
from crvlm_core.methods.refusal_steering.directions import METHODS, fit_directions, relative_lambda
from crvlm_core.methods.refusal_steering.fit import FitConfig, RefusalSteeringFit, dump_fit, fit_refusal_steering
from crvlm_core.methods.refusal_steering.gate import (TopicGate, TopicGatedAdd, best_topic_gate, interventions_of,
                                                      steering_interventions)
from crvlm_core.methods.refusal_steering.induce import induce_refusals, search_induction_alpha
from crvlm_core.methods.refusal_steering.score import (ScoredPrompt, confident_activations, sample_responses,
                                                       score_prompts, select_confident)
from crvlm_core.methods.refusal_steering.search import (ALPHA_GRID, EvalConfig, SearchConfig, evaluate_condition,
                                                        search_alpha, summary_row, validation_objective, warm_up)
from crvlm_core.methods.refusal_steering.select import (LAMBDA_GRID, choose_lambda, layer_profile, layer_scores,
                                                        principal_directions_needed, rank_layers)
from crvlm_core.methods.refusal_steering.study import (StudyConfig, finite, fit_all, organism_summary, score_topics,
                                                       slug, study_metrics, table_rows, unsteered,
                                                       write_study_metrics)
from crvlm_core.methods.refusal_steering.topics import DATASET, TopicSplits, cap_per_subject, check_topics, topic_splits

__all__ = [
    "ALPHA_GRID", "DATASET", "KIND", "LAMBDA_GRID", "METHODS", "EvalConfig", "FitConfig", "RefusalSteeringFit",
    "ScoredPrompt", "SearchConfig", "StudyConfig", "TopicGate", "TopicGatedAdd", "TopicSplits",
    "best_topic_gate", "cap_per_subject", "check_topics", "choose_lambda", "confident_activations", "dump_fit",
    "evaluate_condition", "finite", "fit_all", "fit_directions", "fit_refusal_steering", "induce_refusals",
    "interventions_of", "layer_profile", "layer_scores", "load_refusal_steering", "organism_summary",
    "principal_directions_needed", "rank_layers", "read_refusal_steering", "relative_lambda", "sample_responses",
    "score_prompts", "score_topics", "search_alpha", "search_induction_alpha", "select_confident", "slug",
    "steering_interventions", "study_metrics", "summary_row", "table_rows", "topic_splits", "unsteered",
    "validation_objective", "warm_up", "write_study_metrics",
]
