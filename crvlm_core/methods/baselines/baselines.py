"""Old import path of the baselines (split into system_prompt, cast, lora, vector_baselines, config, artifact, fit,
compare); the names below are re-exported until the integration rewrites their importers."""

from crvlm_core.methods.baselines.artifact import BASELINE_JSON, Baseline, load_baseline  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.cast import ConditionalSteering, condition_scores, grid_search_condition  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.compare import comparison_row, in_scope_kl  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.config import BASELINES, BaselineConfig  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.fit import fit_baseline  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.lora import LoraTrainConfig, lora_targets, train_lora  # re-export; integration rewrites importers
from crvlm_core.methods.baselines.system_prompt import REFUSAL_TEXT, scope_system_prompt  # re-export; integration rewrites importers
