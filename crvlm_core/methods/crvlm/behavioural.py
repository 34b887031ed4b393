"""The behavioural loss (an extension beyond the paper): after the activation losses, fine-tune the calibrator on
what the model *says* — the refusal teacher-forced out of scope, the unsteered next-token distribution in scope."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from tqdm.auto import tqdm

from crvlm_core.data.schema import Sample
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering
from crvlm_core.methods.crvlm.config import BEHAVIOURAL_REFUSAL, BehaviouralConfig
from crvlm_core.models.handle import ModelHandle

__all__ = ["BEHAVIOURAL_REFUSAL", "finetune_behavioural"]


def _forward_with_calibrator(steering: CalibratedSteering, handle: ModelHandle, enc: dict, gate_enc: dict,
                             keep: int) -> torch.Tensor:
    """Logits of the last ``keep`` positions only (the losses read no others; with a 150k vocabulary the projection
    of every position is work and memory for nothing). The calibrator steers what it steers at generation: every
    position, or with ``gate_pass="shared"`` the prompt's last token and what follows it (the last ``keep``)."""
    cal = steering.calibrator
    steering.prepare(handle, gate_enc)
    tail = keep if steering.gate_pass == "shared" else None

    def hook(_m, _i, output, layer):
        if tail is None:
            return cal.apply_hidden(layer, output)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.cat([hidden[:, :-tail], cal.apply_hidden(layer, hidden[:, -tail:])], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    hooks = [handle.torch_layers[layer].register_forward_hook(lambda m, i, o, layer=layer: hook(m, i, o, layer))
             for layer in steering.layers]
    try:
        return handle.hf_model(**enc, logits_to_keep=keep).logits
    finally:
        for h in hooks:
            h.remove()
        steering.release()


def _step(steering: CalibratedSteering, handle: ModelHandle, b_out: list[Sample], b_in: list[Sample],
          config: BehaviouralConfig) -> tuple[float, float]:
    """Backpropagate one batch's two losses (the caller steps the optimiser); ``(ce_out, kl_in)``."""
    # each loss is backpropagated as soon as it is computed, so the two graphs (the layers above the steered ones,
    # for a batch of prompts each) are never held at once; the summed gradient is the same
    # out of scope: teacher-forced refusal, CE on its tokens (logits at t predict token t + 1)
    plain = handle.build_inputs([s.prompt for s in b_out])
    forced = handle.build_inputs([s.prompt for s in b_out], assistant_prefix=config.refusal_text)
    n_ref = int(forced["input_ids"].shape[1] - plain["input_ids"].shape[1])
    logits = _forward_with_calibrator(steering, handle, forced, plain, keep=n_ref + 1)
    targets = forced["input_ids"][:, -n_ref:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    (config.w_ce * ce).backward()
    del logits
    # in scope: keep the next-token distribution of the unsteered model
    enc_in = handle.build_inputs([s.prompt for s in b_in])
    with torch.no_grad():
        ref = torch.log_softmax(handle.hf_model(**enc_in, logits_to_keep=1).logits[:, -1].float(), -1)
    cur = torch.log_softmax(_forward_with_calibrator(steering, handle, enc_in, enc_in, keep=1)[:, -1].float(), -1)
    kl = torch.nn.functional.kl_div(cur, ref, log_target=True, reduction="batchmean")
    (config.w_kl * kl).backward()
    return ce.item(), kl.item()


def _subset(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` of ``samples``, a seeded random subset in their original order (all of them when ``n`` is None)."""
    if n is None or len(samples) <= n:
        return samples
    keep = set(random.Random(seed).sample(range(len(samples)), n))
    return [s for k, s in enumerate(samples) if k in keep]


def finetune_behavioural(steering: CalibratedSteering, handle: ModelHandle, train: Sequence[Sample],
                         config: BehaviouralConfig | None = None, progress: bool = True) -> list[dict]:
    """Fine-tune ``steering``'s calibrator in place on the behavioural loss. Out of scope: cross-entropy of
    ``config.refusal_text`` teacher-forced after the prompt. In scope: KL(unsteered ‖ calibrated) of the next-token
    distribution at the last prompt token. Gradients flow through the frozen layers above the steered ones; the
    calibrator is the only trained part (a prefill gate stays as trained: its ρ is read from the unsteered prompt
    pass). Records ``steering.info["behavioural"]``.

    Returns:
        One dict per epoch with the mean ``ce_out`` and ``kl_in``.
    """
    config = config if config is not None else BehaviouralConfig()
    inn = _subset([s for s in train if s.scope == "in"], config.max_per_scope, config.seed)
    out = _subset([s for s in train if s.scope == "out"], config.max_per_scope, config.seed)
    if not inn or not out:
        raise ValueError("the behavioural loss needs in- and out-of-scope training samples")
    steering.validate(handle)
    cal = steering.calibrator
    frozen_gate = cal.config.gate_fit == "probe"  # fitted alone as a probe: the behavioural loss leaves it as it is
    params = [p for name, p in cal.named_parameters() if not (frozen_gate and ".gate." in name)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    bs = config.batch_size
    for epoch in range(config.epochs):
        order_out = torch.randperm(len(out), generator=gen).tolist()
        order_in = torch.randperm(len(inn), generator=gen).tolist()
        steps = (max(len(out), len(inn)) + bs - 1) // bs
        sums = {"ce_out": 0.0, "kl_in": 0.0}
        bar = tqdm(range(steps), desc=f"behavioural epoch {epoch + 1}", disable=not progress)
        for step in bar:
            b_out = [out[order_out[(step * bs + j) % len(out)]] for j in range(bs)]
            b_in = [inn[order_in[(step * bs + j) % len(inn)]] for j in range(bs)]
            opt.zero_grad(set_to_none=True)
            ce, kl = _step(steering, handle, b_out, b_in, config)
            opt.step()
            sums["ce_out"] += ce
            sums["kl_in"] += kl
            bar.set_postfix(ce=f"{ce:.3f}", kl=f"{kl:.3f}")
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
    for p in params:
        p.requires_grad_(False)
    cal.eval()
    steering.info["behavioural"] = {"epochs": config.epochs, "lr": config.lr, "refusal_text": config.refusal_text,
                                    "n_in": len(inn), "n_out": len(out), "history": history}
    return history
