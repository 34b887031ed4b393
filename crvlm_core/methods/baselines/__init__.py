"""The baselines CR-VLM is compared with: system prompt, persona, ActAdd, CAST, LoRA.
Re-exports for users (``from crvlm_core.methods.baselines import fit_baseline``); library modules import from the
defining module."""

from crvlm_core.methods.baselines.artifact import Baseline, load_baseline
from crvlm_core.methods.baselines.cast import ConditionalSteering, grid_search_condition
from crvlm_core.methods.baselines.compare import comparison_row, in_scope_kl
from crvlm_core.methods.baselines.config import BASELINES, BaselineConfig
from crvlm_core.methods.baselines.fit import fit_baseline, fit_or_load_baseline
from crvlm_core.methods.baselines.lora import LoraTrainConfig, lora_targets, train_lora
from crvlm_core.methods.baselines.system_prompt import REFUSAL_TEXT, scope_system_prompt

__all__ = ["BASELINES", "REFUSAL_TEXT", "Baseline", "BaselineConfig", "ConditionalSteering", "LoraTrainConfig",
           "comparison_row", "fit_baseline", "fit_or_load_baseline", "grid_search_condition", "in_scope_kl",
           "load_baseline", "lora_targets", "scope_system_prompt", "train_lora"]
