"""Where a command's model runs: ``--device``, ``--dtype``, ``--device-map auto`` (a model larger than one GPU) and
``--remote local|ndif`` (its traces on nnsight's simulation of a remote server, or on NDIF), shared by ``fit``,
``eval`` and ``serve``; and the one call that loads a model so placed."""

from __future__ import annotations

import argparse

from crvlm_core.core.errors import InputError
from crvlm_core.models.remote import REMOTES

__all__ = ["DTYPES", "add_placement_options", "load_placed", "placement", "refuse_remote"]

DTYPES = ("float32", "bfloat16", "float16")


def add_placement_options(parser: argparse.ArgumentParser, remote: bool = True) -> None:
    g = parser.add_argument_group("where the model runs (docs/scaling.md)")
    g.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, … (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default float32; bfloat16 on a GPU)")
    g.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread a hub/local model over the GPUs (and CPU) with accelerate")
    if remote:
        g.add_argument("--remote", choices=list(REMOTES), default=None,
                       help="run every trace remotely: local (nnsight's simulation of a server, here: checks the "
                            "run is remote-safe) or ndif (NDIF; key from NDIF_API_KEY; hub ids NDIF serves)")


def load_placed(args: argparse.Namespace, spec: str):
    """``load_model(spec)`` with the command's placement options."""
    from crvlm_core.models.loading import load_model

    if getattr(args, "device", None) and args.device_map:
        raise InputError("give --device or --device-map auto, not both")
    return load_model(spec, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                      device_map=getattr(args, "device_map", None), remote=getattr(args, "remote", None))


def refuse_remote(args: argparse.Namespace, what: str, remotes: tuple[str, ...] = REMOTES) -> None:
    """One line and exit 2 when ``--remote`` is one of ``remotes`` and ``what`` cannot run there."""
    if getattr(args, "remote", None) in remotes:
        raise InputError(f"--remote {args.remote}: {what}")


def placement(handle) -> dict:
    """Where a run's model ran, for ``metrics.json`` / ``fit.json``: device, dtype, device map, remote."""
    return {"device": str(handle.device), "dtype": str(handle.dtype).removeprefix("torch."),
            "device_map": handle.info.get("device_map"), "remote": handle.remote}
