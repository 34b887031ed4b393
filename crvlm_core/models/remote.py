"""Where a handle's nnsight traces run: here (the default), in nnsight's local simulation of a remote server
(``"local"``: the trace is serialized and rebuilt with the project's own modules out of reach, then run here), or on
NDIF (``"ndif"``, the key from ``NDIF_API_KEY``, never logged).

The library's modules that run inside traces (interventions, the calibrator) are shipped by value
(:func:`register_library`): a server has nnsight, torch and transformers installed, not crvlm. nnsight's own
simulation hides the modules it finds on ``sys.path``; an editable install is found by an import hook instead, so
:func:`strict_local_simulation` also hides that hook: a trace that needs crvlm on the far side fails here as it would
on a server.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from crvlm_core.core.errors import InputError

__all__ = ["REMOTES", "check_remote", "register_library", "strict_local_simulation", "trace_options", "unregistered"]

#: Values of ``--remote`` / ``load_model(remote=...)``.
REMOTES = ("local", "ndif")

_PACKAGE = __name__.split(".")[0]
_registered = False


def check_remote(remote: str | None) -> str | None:
    """``remote`` if it is one of :data:`REMOTES` (or None); NDIF also needs ``NDIF_API_KEY`` set. InputError else."""
    if remote in (None, ""):
        return None
    if remote not in REMOTES:
        raise InputError(f"--remote must be one of {', '.join(REMOTES)}, got {remote!r}")
    if remote == "ndif" and not os.environ.get("NDIF_API_KEY"):
        raise InputError("--remote ndif needs an NDIF API key in the environment variable NDIF_API_KEY "
                         "(https://login.ndif.us)")
    return remote


def register_library() -> None:
    """Ship this package's modules by value with every remote trace (once per process)."""
    global _registered
    if not _registered:
        import nnsight

        nnsight.register(_PACKAGE)
        _registered = True


def trace_options(remote: str | None, model) -> dict:
    """Keyword arguments for ``model.trace`` / ``model.generate`` that send the trace where ``remote`` says."""
    if remote is None:
        return {}
    register_library()
    if remote == "local":
        return {"backend": strict_local_simulation(model)}
    return {"remote": True}


def strict_local_simulation(model):
    """nnsight's local simulation backend for ``model``, with editable-install import hooks hidden too while the
    trace is rebuilt (nnsight is imported here, not when the CLI starts)."""
    from nnsight.intervention.backends.local import LocalSimulationBackend

    class StrictLocalSimulation(LocalSimulationBackend):
        def _hide_local_modules(self) -> dict:
            hidden = super()._hide_local_modules()
            hidden["finders"] = [f for f in sys.meta_path if _is_editable_finder(f)]
            for finder in hidden["finders"]:
                sys.meta_path.remove(finder)
            return hidden

        def _restore(self, hidden: dict) -> None:
            sys.meta_path.extend(f for f in hidden.get("finders", []) if f not in sys.meta_path)
            super()._restore(hidden)

    return StrictLocalSimulation(model)


def _is_editable_finder(finder) -> bool:
    module = getattr(finder, "__module__", "") or getattr(type(finder), "__module__", "")
    return module.startswith("__editable__")


@contextmanager
def unregistered():
    """For tests: the package not shipped by value inside the block (a remote trace then fails to rebuild)."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    was = _PACKAGE in _PICKLE_BY_VALUE_MODULES
    _PICKLE_BY_VALUE_MODULES.discard(_PACKAGE)
    try:
        yield
    finally:
        if was:
            _PICKLE_BY_VALUE_MODULES.add(_PACKAGE)
