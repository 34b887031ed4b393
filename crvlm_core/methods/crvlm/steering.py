"""CR-VLM end to end: a teacher-forced refusal vector, a calibrator trained on cached activations of scoped data,
and the intervention that applies it on every token at generation — gated on the steered layer's own state (the
paper) or on a late-layer summary of the prompt computed once at prefill (``gate_layer``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.methods.crvlm.calibrator import Calibrator, CalibratorConfig, train_calibrator
from crvlm_core.data.samples import Sample
from crvlm_core.extract import extract, extract_token_states
from crvlm_core.core.io import atomic_write_json
from crvlm_core.models.loading import ModelHandle
from crvlm_core.methods.refusal_vectors import REFUSAL_PREFIX, default_layers, fit_vector
from crvlm_core.steer.interventions import PrefillGate
from crvlm_core.vectors.estimators import SteeringVector

__all__ = ["CalibratedSteering", "fit_crvlm", "finetune_behavioural", "load_calibrated", "default_gate_layer",
           "vision_counterfactual_shifts",
           "CRVLM_JSON"]

CRVLM_JSON = "crvlm.json"
VECTOR_DIR = "refusal_vector"


def default_gate_layer(handle: ModelHandle) -> int:
    """A late layer (90 % of the depth): where scope is linearly separable (probe 0.98–1.00 at layers 22–24 of
    Qwen2.5-0.5B, 0.95–0.98 at 23–29 of SmolLM2), unlike the layers where steering bites."""
    return min(handle.n_layers - 1, round(0.9 * handle.n_layers))


@dataclass
class CalibratedSteering(PrefillGate):
    """The calibrator as an intervention. With ``gate_layer`` set, each batch first runs one unsteered prompt pass
    to read the last prompt token at that layer; the gate value ρ of each row is fixed from it for the prompt pass
    and every generated token (prefill gating)."""

    calibrator: Calibrator
    layers: tuple[int, ...]
    gate_layer: int | None = None
    info: dict = field(default_factory=dict)
    vector: SteeringVector | None = None  # the refusal vector the targets were built from (saved alongside)
    fixed_gate: float | None = None  # ablation "gate off": ρ held at this value for every row (e.g. 1.0)

    def __post_init__(self):
        self.layers = tuple(int(l) for l in self.layers)
        if self.fixed_gate is not None and not 0.0 <= float(self.fixed_gate) <= 1.0:
            raise ValueError(f"fixed_gate must be in [0, 1], got {self.fixed_gate}")

    def prepare(self, handle: ModelHandle, enc: dict) -> None:
        if self.fixed_gate is None:
            return super().prepare(handle, enc)
        rows = torch.full((enc["input_ids"].shape[0],), float(self.fixed_gate))
        self.calibrator.set_gate_override({l: rows for l in self.layers})

    def validate(self, handle: ModelHandle) -> None:
        self.calibrator.check_compatible(handle.n_layers, handle.hidden_size)  # the model mismatch first
        super().validate(handle)

    def set_gate(self, summary: torch.Tensor) -> None:
        self.calibrator.set_gate_override(self.calibrator.gate_values(summary))

    def clear_gate(self) -> None:
        self.calibrator.clear_gate_override()

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.calibrator.apply_hidden(layer, hidden)

    @torch.no_grad()
    def gate(self, handle: ModelHandle, samples: Sequence[Sample], batch_size: int = 8) -> torch.Tensor:
        """Mean gate value ρ over the steered layers for each sample (read at the last prompt token)."""
        return self.calibrated_states(handle, samples, batch_size=batch_size)[2].mean(1)

    @torch.no_grad()
    def calibrated_states(self, handle: ModelHandle, samples: Sequence[Sample], batch_size: int = 8,
                          cache: bool | str | Path = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last-prompt-token states of the steered layers before and after the calibrator, and the gate.

        Each layer's state is read from the unsteered model and calibrated on its own (the calibrator's effect at
        that layer, not the knock-on effect of steering the layers below). Returns ``(original [n, L, d],
        calibrated [n, L, d], rho [n, L])`` with ``L = len(self.layers)``; ``fixed_gate`` is honoured.
        """
        read = sorted(set(self.layers) | ({self.gate_layer} if self.gate_layer is not None else set()))
        acts = extract(handle, samples, layers=read, batch_size=batch_size, cache=cache, progress=False)
        original = torch.stack([acts.at(l) for l in self.layers], dim=1).float()
        if self.fixed_gate is not None:
            rho = torch.full(original.shape[:2], float(self.fixed_gate))
            with self.calibrator.gate_override({l: rho[:, j] for j, l in enumerate(self.layers)}):
                calibrated = torch.stack([self.calibrator(original[:, j], l)[0] for j, l in enumerate(self.layers)], 1)
            return original, calibrated, rho
        gate_input = acts.at(self.gate_layer).float() if self.gate_layer is not None else None
        outs = [self.calibrator(original[:, j], l, gate_input) for j, l in enumerate(self.layers)]
        return original, torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1)

    def save(self, directory: str | Path) -> Path:
        """``calibrator.safetensors`` + ``calibrator.json`` + ``crvlm.json`` (+ the refusal vector if given)."""
        directory = Path(directory)
        self.calibrator.save(directory)
        if self.vector is not None:
            self.vector.save(directory / VECTOR_DIR)
        atomic_write_json(directory / CRVLM_JSON, {"layers": list(self.layers), "gate_layer": self.gate_layer,
                                                   **self.info})
        return directory


def load_calibrated(directory: str | Path) -> CalibratedSteering:
    """Load what :meth:`CalibratedSteering.save` wrote."""
    directory = Path(directory)
    if not (directory / CRVLM_JSON).exists():
        raise FileNotFoundError(f"{directory} has no {CRVLM_JSON}: not a CR-VLM calibrator folder")
    meta = json.loads((directory / CRVLM_JSON).read_text())
    vector = SteeringVector.load(directory / VECTOR_DIR) if (directory / VECTOR_DIR).exists() else None
    return CalibratedSteering(Calibrator.load(directory), tuple(meta.pop("layers")), meta.pop("gate_layer"), meta, vector)


def vision_counterfactual_shifts(handle: ModelHandle, out: Sequence[Sample], inn: Sequence[Sample],
                                 layers: Sequence[int], refusal_prefix: str = REFUSAL_PREFIX, seed: int = 42,
                                 batch_size: int = 8, cache: bool = True,
                                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Vision-only counterfactual shifts of the out-of-scope samples (CR-VLM eq. 10–11).

    ``r_i = h(img_out_i ⊕ text_i ⊕ refusal_prefix) − h(img_in_π(i) ⊕ text_i)``, read at the last token (the prefix's
    last token on the refusal side, the prompt's last token on the other) of each of ``layers``: only the image
    changes between the two sides (plus the teacher-forced refusal prefix on the out-of-scope side). Each
    out-of-scope image sample is paired with an in-scope image sample: a seeded permutation of the in-scope image
    samples, cycled through when there are more out-of-scope image samples than in-scope ones.

    Returns:
        ``(shifts [n_out, len(layers), d], mask [n_out] bool, paired_ids)``: rows of samples without an image (or
        every row, when no in-scope sample has an image or the model is text-only) are zero with ``mask`` False;
        ``paired_ids[i]`` is the id of the in-scope sample whose image row ``i`` was swapped to (``None`` if none).
    """
    out, inn = list(out), list(inn)
    layers = sorted({handle.check_layer(int(l)) for l in layers})
    shifts = torch.zeros(len(out), len(layers), handle.hidden_size)
    mask = torch.zeros(len(out), dtype=torch.bool)
    paired: list[str | None] = [None] * len(out)
    rows = [k for k, s in enumerate(out) if s.image is not None]
    pool = [s for s in inn if s.image is not None]
    if not handle.is_vlm or not rows or not pool:
        return shifts, mask, paired
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    partners = [pool[order[j % len(pool)]] for j in range(len(rows))]
    refusal_side = [out[k] for k in rows]
    # The same question with the in-scope image; the id names the pair so extraction caches stay distinct.
    swapped = [replace(out[k], id=f"{out[k].id}@image:{p.id}", image=p.image) for k, p in zip(rows, partners)]
    kw = dict(layers=layers, position="last", batch_size=batch_size, cache=cache, progress=progress)
    h_ref = extract(handle, refusal_side, assistant_prefix=refusal_prefix, desc="vision cf: out image + prefix", **kw)
    h_swap = extract(handle, swapped, desc="vision cf: in-scope image", **kw)
    shifts[rows] = h_ref.acts - h_swap.acts
    mask[rows] = True
    for k, p in zip(rows, partners):
        paired[k] = p.id
    return shifts, mask, paired


def fit_crvlm(handle: ModelHandle, train: Sequence[Sample], layers: Sequence[int] | None = None,
              gate_layer: int | str | None = "auto", target_scale: float = 1.0, vector: SteeringVector | None = None,
              width: int = 1024, epochs: int = 40, lr: float = 3e-4, batch_size: int = 32, seed: int = 42,
              w_out: float = 1.0, w_in: float = 1.0, w_ortho: float = 1.0, w_vision: float = 1.0,
              val_fraction: float = 0.0, patience: int | None = None, shared: bool = False,
              out_dir: str | Path | None = None, extract_batch_size: int = 8, train_positions: str = "tokens",
              positions_per_prompt: int = 8, progress: bool = True) -> CalibratedSteering:
    """Fit CR-VLM on scoped training samples.

    Args:
        layers: steered layers (default: a third of the way up).
        gate_layer: ``"auto"`` → :func:`default_gate_layer` (prefill gating); an int → that layer; ``None`` → the
            paper's gate, reading the steered layer's own hidden state.
        target_scale: λ of the out-of-scope target ``h + λ·s`` (eq. 3).
        vector: the teacher-forced refusal vector ``s`` (fitted here when not given).
        out_dir: where checkpoints and the per-epoch loss log go (training resumes from them).
        train_positions: ``"tokens"`` — train on the last prompt token plus ``positions_per_prompt`` random other
            prompt tokens of each sample (the calibrator is applied at every position at generation, so it is trained
            on such positions; with a prefill gate, each token's gate input is its prompt's summary); ``"last"`` —
            only the last prompt token (the paper's reading).
        w_vision: weight of the vision loss (eq. 11–12). On a VLM whose out-of-scope training samples have images
            (and some in-scope ones too), the vision-only counterfactual shift of each out-of-scope image sample
            (:func:`vision_counterfactual_shifts`) is passed to the calibrator, every training state of a sample
            carrying its sample's shift; ``info["vision_loss"]`` records whether the term was active and its final
            value. Text-only models and text-only data train without it.
        Remaining arguments: :class:`~crvlm_core.methods.crvlm.calibrator.CalibratorConfig` fields. Defaults differ from the
            paper's (200 epochs, batch 8, lr 1e-4 on one state per prompt) because each prompt contributes
            ``positions_per_prompt + 1`` states: 40 epochs of batch 32 at lr 3e-4 take a similar number of steps.
    """
    start = time.perf_counter()
    layers = sorted({handle.check_layer(int(l)) for l in (layers if layers is not None else default_layers(handle))})
    if gate_layer == "auto":
        gate_layer = default_gate_layer(handle)
    if gate_layer is not None:
        gate_layer = handle.check_layer(int(gate_layer))
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    if not inn or not out:
        raise ValueError(f"CR-VLM needs in- and out-of-scope training samples (got {len(inn)} in, {len(out)} out)")
    if vector is None:
        vector = fit_vector(handle, train, "teacher-forced", layers=layers, progress=progress)
    vector.check_compatible(handle.n_layers, handle.hidden_size)
    if train_positions not in ("tokens", "last"):
        raise ValueError(f"train_positions must be 'tokens' or 'last', got {train_positions!r}")
    read = sorted(set(layers) | ({gate_layer} if gate_layer is not None else set()))
    kw = dict(layers=read, batch_size=extract_batch_size, progress=progress)
    a_in, a_out = extract(handle, inn, desc="in-scope", **kw), extract(handle, out, desc="out-of-scope", **kw)
    idx = [read.index(l) for l in layers]
    gate_in = a_in.acts[:, read.index(gate_layer)] if gate_layer is not None else None
    gate_out = a_out.acts[:, read.index(gate_layer)] if gate_layer is not None else None
    x_in, x_out = a_in.acts[:, idx], a_out.acts[:, idx]
    if train_positions == "tokens":
        tok = dict(per_sample=positions_per_prompt, seed=seed, batch_size=extract_batch_size, progress=progress)
        x_in, own_in = extract_token_states(handle, inn, layers, **tok)
        x_out, own_out = extract_token_states(handle, out, layers, **tok)
        gate_in = gate_in[own_in] if gate_in is not None else None
        gate_out = gate_out[own_out] if gate_out is not None else None
    vision, vision_info = None, {"active": False}
    if w_vision > 0 and handle.is_vlm and any(s.image is not None for s in out):
        prefix = (vector.extra or {}).get("refusal_prefix") or REFUSAL_PREFIX
        shifts, mask, paired = vision_counterfactual_shifts(handle, out, inn, layers, refusal_prefix=prefix,
                                                            seed=seed, batch_size=extract_batch_size,
                                                            progress=progress)
        if mask.any():
            if train_positions == "tokens":  # every token state of an image sample carries its sample's shift
                shifts, mask = shifts[own_out], mask[own_out]
            vision = {"shifts": shifts, "mask": mask}
            vision_info = {"active": True, "refusal_prefix": prefix,
                           "n_image_samples": sum(p is not None for p in paired), "n_image_rows": int(mask.sum())}
        else:
            vision_info["reason"] = "no in-scope training sample has an image to swap in"
    cfg = CalibratorConfig(hidden_size=handle.hidden_size, layers=layers, width=width, shared=shared,
                           gate_dim=handle.hidden_size if gate_layer is not None else None, target_scale=target_scale,
                           w_out=w_out, w_in=w_in, w_ortho=w_ortho, w_vision=w_vision, lr=lr, batch_size=batch_size,
                           epochs=epochs, seed=seed, val_fraction=val_fraction, patience=patience)
    out_dir = Path(out_dir) if out_dir is not None else None
    calibrator, history = train_calibrator(
        cfg, x_in, x_out, vector.directions[layers], gate_in, gate_out, vision,
        checkpoint_dir=out_dir / "checkpoints" if out_dir else None, log_path=out_dir / "train_log.jsonl" if out_dir else None,
        progress=progress, model_spec=handle.spec, n_model_layers=handle.n_layers, vector_fingerprint=vector.fingerprint)
    info = {"model": handle.spec, "target_scale": target_scale, "n_in": len(inn), "n_out": len(out),
            "train_positions": train_positions, "n_train_states": [len(x_in), len(x_out)],
            "vector_method": vector.method, "vector_fingerprint": vector.fingerprint,
            "fit_seconds": time.perf_counter() - start, "final_losses": history[-1] if history else {}}
    if vision_info["active"]:
        vision_info["final"] = next((h["loss_vision"] for h in reversed(history) if "loss_vision" in h), None)
    info["vision_loss"] = vision_info
    return CalibratedSteering(calibrator, tuple(layers), gate_layer, info, vector)


#: The refusal the behavioural loss teaches out of scope (teacher-forced after the prompt).
BEHAVIOURAL_REFUSAL = "I'm sorry, but I can't assist with that."


def finetune_behavioural(steering: CalibratedSteering, handle: ModelHandle, train: Sequence[Sample], epochs: int = 1,
                         lr: float = 1e-4, batch_size: int = 4, w_ce: float = 1.0, w_kl: float = 1.0,
                         refusal_text: str = BEHAVIOURAL_REFUSAL, seed: int = 42, progress: bool = True) -> list[dict]:
    """Behavioural loss (an extension beyond the paper): after the activation losses, fine-tune the calibrator on
    what the model *says*. Out of scope: cross-entropy of ``refusal_text`` teacher-forced after the prompt. In
    scope: KL(unsteered ‖ calibrated) of the next-token distribution at the last prompt token. Gradients flow
    through the frozen layers above the steered ones; the calibrator is the only trained part (a prefill gate stays
    as trained: its ρ is read from the unsteered prompt pass).

    Returns:
        One dict per epoch with the mean ``ce_out`` and ``kl_in``.
    """
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    if not inn or not out:
        raise ValueError("the behavioural loss needs in- and out-of-scope training samples")
    steering.validate(handle)
    cal = steering.calibrator
    params = [p for p in cal.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history: list[dict] = []

    def hook(layer):
        return lambda _m, _i, output: cal.apply_hidden(layer, output)

    def forward_with_calibrator(enc: dict, gate_enc: dict, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions only (the losses read no others; with a 150k vocabulary the
        projection of every position is work and memory for nothing)."""
        steering.prepare(handle, gate_enc)
        hooks = [handle.torch_layers[l].register_forward_hook(hook(l)) for l in steering.layers]
        try:
            return handle.hf_model(**enc, logits_to_keep=keep).logits
        finally:
            for h in hooks:
                h.remove()
            steering.release()

    from tqdm.auto import tqdm

    for epoch in range(epochs):
        order_out = torch.randperm(len(out), generator=gen).tolist()
        order_in = torch.randperm(len(inn), generator=gen).tolist()
        steps = (max(len(out), len(inn)) + batch_size - 1) // batch_size
        sums = {"ce_out": 0.0, "kl_in": 0.0}
        bar = tqdm(range(steps), desc=f"behavioural epoch {epoch + 1}", disable=not progress)
        for step in bar:
            b_out = [out[order_out[(step * batch_size + j) % len(out)]] for j in range(batch_size)]
            b_in = [inn[order_in[(step * batch_size + j) % len(inn)]] for j in range(batch_size)]
            # each loss is backpropagated as soon as it is computed, so the two graphs (the layers above the steered
            # ones, for a batch of prompts each) are never held at once; the summed gradient is the same
            opt.zero_grad(set_to_none=True)
            # out of scope: teacher-forced refusal, CE on its tokens (logits at t predict token t + 1)
            plain = handle.build_inputs([s.prompt for s in b_out])
            forced = handle.build_inputs([s.prompt for s in b_out], assistant_prefix=refusal_text)
            n_ref = int(forced["input_ids"].shape[1] - plain["input_ids"].shape[1])
            logits = forward_with_calibrator(forced, plain, keep=n_ref + 1)
            targets = forced["input_ids"][:, -n_ref:]
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   targets.reshape(-1))
            (w_ce * ce).backward()
            del logits
            # in scope: keep the next-token distribution of the unsteered model
            enc_in = handle.build_inputs([s.prompt for s in b_in])
            with torch.no_grad():
                ref = torch.log_softmax(handle.hf_model(**enc_in, logits_to_keep=1).logits[:, -1].float(), -1)
            cur = torch.log_softmax(forward_with_calibrator(enc_in, enc_in, keep=1)[:, -1].float(), -1)
            kl = torch.nn.functional.kl_div(cur, ref, log_target=True, reduction="batchmean")
            (w_kl * kl).backward()
            opt.step()
            sums["ce_out"] += ce.item()
            sums["kl_in"] += kl.item()
            bar.set_postfix(ce=f"{ce.item():.3f}", kl=f"{kl.item():.3f}")
        history.append({"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}})
    for p in params:
        p.requires_grad_(False)
    cal.eval()
    steering.info["behavioural"] = {"epochs": epochs, "lr": lr, "refusal_text": refusal_text, "history": history}
    return history
