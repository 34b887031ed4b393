"""Old home of the CR-VLM calibrator, now split into config, module, losses, data and train: the names other areas
still import from here are re-exported until the integration rewrites their imports."""

from crvlm_core.methods.crvlm.config import CalibratorConfig  # re-export; integration rewrites importers
from crvlm_core.methods.crvlm.module import Calibrator  # re-export; integration rewrites importers
from crvlm_core.methods.crvlm.train import train_calibrator  # re-export; integration rewrites importers

__all__ = ["Calibrator", "CalibratorConfig", "train_calibrator"]
