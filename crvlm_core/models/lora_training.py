"""The optimisation loop shared by the LoRA refusal baseline and the refusal organism's adapter.

Both fine-tune a peft LoRA model with AdamW on mini-batches of token ids; they differ only in how batches are
built and how the loss is read (the baseline keeps the last logits of left-padded prompts, the organism lets
transformers shift right-padded labels), so those are arguments.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


def train_lora_steps(model: torch.nn.Module, batches: Iterable[dict], loss_of: Callable[[torch.nn.Module, dict], torch.Tensor],
                     lr: float, total: int | None = None, weight_decay: float = 0.0, desc: str = "LoRA",
                     progress: bool = True) -> list[float]:
    """One AdamW step per batch on the model's trainable parameters; returns the loss of each step.

    Raises:
        FloatingPointError: a step's loss is not finite (the learning rate is too high for this model).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_lora_steps: the model has no trainable parameters (no adapter attached?)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    with tqdm(batches, total=total, desc=desc, disable=not progress, unit="step") as bar:
        for batch in bar:
            loss = loss_of(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: training diverged at step {len(losses) + 1} "
                                         f"(loss {float(loss.detach())}); lower lr={lr}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses
