"""How interventions attach to a model: grouped by layer, checked against the model, prepared per batch, and
applied inside an nnsight trace or as plain PyTorch forward hooks around ``generate``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import Intervention

__all__ = ["apply_in_trace", "by_layer", "hooked", "interventions_of", "prepared", "validated"]


def by_layer(interventions: Iterable[Intervention]) -> dict[int, list[Intervention]]:
    """Layer → the interventions at it (in the given order), layers in forward order."""
    table: dict[int, list[Intervention]] = {}
    for iv in interventions:
        for layer in iv.layers:
            table.setdefault(layer, []).append(iv)
    return dict(sorted(table.items()))


def apply_in_trace(handle: ModelHandle, table: dict[int, list[Intervention]]) -> None:
    """Inside a trace: rewrite each steered layer's output (layers in forward order)."""
    for layer, ivs in table.items():
        out = handle.layers[layer].output
        new = out
        for iv in ivs:
            new = iv.apply(layer, new)
        handle.layers[layer].output = new


def validated(handle: ModelHandle, interventions: Sequence[Intervention]) -> dict[int, list[Intervention]]:
    """Check every intervention against ``handle`` and return the :func:`by_layer` table."""
    for iv in interventions:
        iv.validate(handle)
    return by_layer(interventions)


class prepared:
    """``with prepared(handle, interventions, enc):`` — per-batch prepare/release of every intervention. With
    ``skip`` (interventions whose gate the caller sets itself, in a shared prompt pass), those are not prepared,
    only released."""

    def __init__(self, handle: ModelHandle, interventions: Iterable[Intervention], enc: dict,
                 skip: Iterable[Intervention] = ()):
        self.handle, self.ivs, self.enc = handle, list(interventions), enc
        self.skip = {id(iv) for iv in skip}

    def __enter__(self):
        for iv in self.ivs:
            if id(iv) not in self.skip:
                iv.prepare(self.handle, self.enc)
        return self

    def __exit__(self, *exc):
        for iv in self.ivs:
            iv.release()
        return False


def interventions_of(table: dict[int, list[Intervention]]) -> list[Intervention]:
    """The distinct interventions of a :func:`by_layer` table, in order of first appearance."""
    seen: dict[int, Intervention] = {}
    for ivs in table.values():
        for iv in ivs:
            seen.setdefault(id(iv), iv)
    return list(seen.values())


def _layer_hook(layer: int, ivs: list[Intervention]):
    """A forward hook rewriting decoder layer ``layer``'s output (a tensor, or a tuple whose first item is one)."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for iv in ivs:
            hidden = iv.apply(layer, hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


@contextmanager
def hooked(handle: ModelHandle, table: dict[int, list[Intervention]]):
    """``with hooked(handle, table):`` — the interventions as plain forward hooks on the decoder layers, for any
    forward or ``generate`` of ``handle.hf_model`` inside the block (outside any nnsight trace)."""
    hooks = [handle.torch_layers[layer].register_forward_hook(_layer_hook(layer, ivs)) for layer, ivs in table.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
