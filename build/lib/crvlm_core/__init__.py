"""crvlm_core: configurable refusal by activation steering (CR-VLM calibrators, refusal-steering vectors).
Import the pieces from their modules: models, data, extract, vectors, steer, calibrator, judge, metrics."""

__version__ = "0.1.0"
