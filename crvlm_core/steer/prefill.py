"""The shared prompt pass of prefill gates with ``gate_pass="shared"``: one unsteered prompt pass reads every such
gate at its layers and leaves the key/value cache of the prompt without its last token, which the steered generation
then computes again (steered) and continues from. Plain generation's cost plus one token."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from crvlm_core.models.handle import ModelHandle
from crvlm_core.models.specs import FAMILIES
from crvlm_core.steer.base import Intervention, PrefillGate

__all__ = ["continuation_inputs", "shared_gates", "shared_prompt_pass"]


def shared_gates(interventions: Iterable[Intervention]) -> list[PrefillGate]:
    """The interventions whose gate a shared prompt pass sets (:attr:`PrefillGate.shares_prompt_pass`)."""
    return [iv for iv in interventions if isinstance(iv, PrefillGate) and iv.shares_prompt_pass]


def _state_reader(summaries: dict[int, torch.Tensor], layer: int):
    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        summaries[layer] = hidden[:, -1].detach().float()

    return hook


@torch.no_grad()
def shared_prompt_pass(handle: ModelHandle, enc: dict, gates: Sequence[PrefillGate]):
    """Run the unsteered prompt pass of one batch, set each gate from the last prompt token at its layers, and return
    the key/value cache of the prompt without its last token (for ``generate(..., cache=...)`` with
    :func:`continuation_inputs`). The pass is ``generate``'s own first step (so position ids, image features and
    rotary offsets are built as a plain generation builds them); it projects only the last position's logits."""
    summaries: dict[int, torch.Tensor] = {}
    read = sorted({layer for g in gates for layer in g.gate_read_layers})
    hooks = [handle.torch_layers[layer].register_forward_hook(_state_reader(summaries, layer)) for layer in read]
    try:
        out = handle.hf_model.generate(**enc, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                       pad_token_id=handle.tokenizer.pad_token_id)
    finally:
        for h in hooks:
            h.remove()
    for g in gates:  # the gates are set after the pass: it is unsteered, the steered generation follows
        g.set_gate(torch.cat([summaries[layer] for layer in g.gate_read_layers], dim=-1))
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else out.past_key_values
    cache.crop(-1)  # the last prompt token is computed again, steered
    return cache


def continuation_inputs(handle: ModelHandle, enc: dict) -> dict:
    """The inputs of a generation that continues from :func:`shared_prompt_pass`'s cache: the image inputs are in
    the cache already, so only the token ids and attention mask go again, except for families whose ``generate``
    requires the image (InstructBLIP)."""
    if FAMILIES.get(handle.family, FAMILIES["causal"]).needs_image:
        return dict(enc)
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
