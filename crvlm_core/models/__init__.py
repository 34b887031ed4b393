"""Stage 2, models: one handle for every supported model (embedded GGUF wheels, hub ids, local folders, offline VLM builders, organisms).
Users may write ``from crvlm_core.models import load_model`` (resolved on first use); library modules import from the defining module."""

from __future__ import annotations

import importlib

__all__ = ["DEFAULT_MODEL", "ModelHandle", "list_specs", "load_model", "unload_model"]

# name → defining module; resolved lazily, so importing one submodule (the handle, from extract) loads no other
_EXPORTS = {"DEFAULT_MODEL": "specs", "ModelHandle": "handle", "list_specs": "specs", "load_model": "loading",
            "unload_model": "loading"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"crvlm_core.models.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'crvlm_core.models' has no attribute {name!r}")
