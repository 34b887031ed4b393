"""CR-VLM: a teacher-forced refusal vector and a gated calibrator trained on cached activations.

Re-exports the public names for users (``from crvlm_core.methods.crvlm import CrvlmConfig, fit_crvlm``); library
modules import them from the modules that define them."""

from crvlm_core.methods.crvlm.behavioural import finetune_behavioural
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering, default_gate_layer, load_calibrated
from crvlm_core.methods.crvlm.config import BehaviouralConfig, CalibratorConfig, CrvlmConfig
from crvlm_core.methods.crvlm.module import Calibrator
from crvlm_core.methods.crvlm.steering import fit_crvlm, vision_counterfactual_shifts
from crvlm_core.methods.crvlm.train import TrainRun, train_calibrator

__all__ = ["BehaviouralConfig", "CalibratedSteering", "Calibrator", "CalibratorConfig", "CrvlmConfig", "TrainRun",
           "default_gate_layer", "finetune_behavioural", "fit_crvlm", "load_calibrated", "train_calibrator",
           "vision_counterfactual_shifts"]
