"""Where crvlm keeps things on disk: the per-machine model cache and the run outputs.
Both can be moved with environment variables (CRVLM_CACHE, CRVLM_OUTPUTS)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "outputs_dir", "repo_root"]


def repo_root() -> Path:
    """The checkout this package lives in (its parent folder)."""
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """Per-machine cache for converted model weights (outside git).

    ``$CRVLM_CACHE`` if set, else ``$XDG_CACHE_HOME/crvlm``, else ``~/.cache/crvlm``.
    """
    env = os.environ.get("CRVLM_CACHE")
    if env:
        root = Path(env)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crvlm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def outputs_dir() -> Path:
    """Where runs write their artifacts: ``$CRVLM_OUTPUTS`` or ``<repo>/outputs``."""
    env = os.environ.get("CRVLM_OUTPUTS")
    root = Path(env) if env else repo_root() / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    return root
