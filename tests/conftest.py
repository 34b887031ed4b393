"""Shared fixtures: real models are loaded once per test session (load_model caches per process)."""

import warnings

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped where torch sees no CUDA GPU (scripts/gpu_check.sh runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch sees none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    from crvlm_core.models.loading import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def qwen():
    from crvlm_core.models.loading import load_model

    return load_model("qwen2.5-0.5b", device="cpu")
