"""CR-VLM fitted end to end on a model: a teacher-forced refusal vector, the training states of scoped data (the
last prompt token, or it and random other prompt tokens), vision counterfactuals on a VLM, then the calibrator."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.data.framing import framing_augment
from crvlm_core.data.schema import Sample
from crvlm_core.extract import extract, extract_token_states
from crvlm_core.methods.crvlm.behavioural import finetune_behavioural
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering, default_gate_layer
from crvlm_core.methods.crvlm.config import CrvlmConfig
from crvlm_core.methods.crvlm.train import TrainRun, train_calibrator
from crvlm_core.methods.refusal_vectors import REFUSAL_PREFIX, VectorConfig, default_layers, fit_vector
from crvlm_core.models.handle import ModelHandle
from crvlm_core.vectors.steering_vector import SteeringVector


__all__ = ["CalibratedSteering", "default_gate_layer", "finetune_behavioural", "fit_crvlm", "training_sets",
           "vision_counterfactual_shifts"]


def vision_counterfactual_shifts(handle: ModelHandle, out: Sequence[Sample], inn: Sequence[Sample],
                                 layers: Sequence[int], refusal_prefix: str = REFUSAL_PREFIX, seed: int = 42,
                                 batch_size: int = 8, cache_dir: bool | str | Path | None = True,
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
        ``cache_dir`` is the activation cache (:func:`~crvlm_core.extract.extract`'s).
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
    kw = dict(layers=layers, position="last", batch_size=batch_size, cache_dir=cache_dir)
    h_ref = extract(handle, refusal_side, assistant_prefix=refusal_prefix,
                    progress=progress and "vision cf: out image + prefix", **kw)
    h_swap = extract(handle, swapped, progress=progress and "vision cf: in-scope image", **kw)
    shifts[rows] = h_ref.acts - h_swap.acts
    mask[rows] = True
    for k, p in zip(rows, partners):
        paired[k] = p.id
    return shifts, mask, paired


def _framed_copies(train: list[Sample], config: CrvlmConfig) -> list[Sample]:
    """``config.framing_augment`` framed copies of every training question (copy ``k`` seeded ``config.seed + k``,
    id suffix ``#k``), in the scope of the in-scope training questions' subjects."""
    scope = sorted({s.subject for s in train if s.scope == "in"})
    return [replace(f, id=f"{f.id}#{k}") for k in range(config.framing_augment)
            for f in framing_augment(train, scope, seed=config.seed + k)]


def training_sets(train: Sequence[Sample], config: CrvlmConfig) -> tuple[list[Sample], list[Sample]]:
    """``(in-scope, out-of-scope)`` samples the calibrator trains on, in the order :func:`fit_crvlm` reads them: the
    training questions of each scope, then their framed copies (``config.framing_augment``). Reading the same lists
    (``extract(..., layers, batch_size=config.extract_batch_size)``) hits the fit's activation cache."""
    train = list(train)
    return _by_scope(train + (_framed_copies(train, config) if config.framing_augment else []))


def _by_scope(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    return [s for s in samples if s.scope == "in"], [s for s in samples if s.scope == "out"]


def _training_states(handle: ModelHandle, inn: list[Sample], out: list[Sample], layers: list[int],
                     gate_read: list[int], config: CrvlmConfig, progress: bool) -> dict:
    """The states the calibrator trains on: ``x_in``/``x_out`` ``[n, L, d]``, their gate inputs (the last prompt
    token at the ``gate_read`` layers, concatenated; ``None`` without a prefill gate) and ``own_out``, the sample each
    out-of-scope state belongs to (``None`` for last-token states)."""
    read = sorted(set(layers) | set(gate_read))
    kw = dict(layers=read, batch_size=config.extract_batch_size)
    a_in = extract(handle, inn, progress=progress and "in-scope", **kw)
    a_out = extract(handle, out, progress=progress and "out-of-scope", **kw)
    idx = [read.index(l) for l in layers]
    g_idx = [read.index(l) for l in gate_read]
    gate_in = a_in.acts[:, g_idx].flatten(1) if gate_read else None
    gate_out = a_out.acts[:, g_idx].flatten(1) if gate_read else None
    states = {"x_in": a_in.acts[:, idx], "x_out": a_out.acts[:, idx], "gate_in": gate_in, "gate_out": gate_out,
              "own_out": None}
    if config.train_positions == "tokens":
        tok = dict(per_sample=config.positions_per_prompt, seed=config.seed, batch_size=config.extract_batch_size,
                   progress=progress)
        states["x_in"], own_in = extract_token_states(handle, inn, layers, **tok)
        states["x_out"], states["own_out"] = extract_token_states(handle, out, layers, **tok)
        states["gate_in"] = gate_in[own_in] if gate_in is not None else None
        states["gate_out"] = gate_out[states["own_out"]] if gate_out is not None else None
    return states


def _vision_data(handle: ModelHandle, inn: list[Sample], out: list[Sample], layers: list[int],
                 vector: SteeringVector, states: dict, config: CrvlmConfig, progress: bool) -> tuple[dict | None, dict]:
    """``(vision input of train_calibrator or None, info["vision_loss"])``."""
    if not (config.w_vision > 0 and handle.is_vlm and any(s.image is not None for s in out)):
        return None, {"active": False}
    prefix = (vector.extra or {}).get("refusal_prefix") or REFUSAL_PREFIX
    shifts, mask, paired = vision_counterfactual_shifts(handle, out, inn, layers, refusal_prefix=prefix,
                                                        seed=config.seed, batch_size=config.extract_batch_size,
                                                        progress=progress)
    if not mask.any():
        return None, {"active": False, "reason": "no in-scope training sample has an image to swap in"}
    if states["own_out"] is not None:  # every token state of an image sample carries its sample's shift
        shifts, mask = shifts[states["own_out"]], mask[states["own_out"]]
    return {"shifts": shifts, "mask": mask}, {"active": True, "refusal_prefix": prefix,
                                             "n_image_samples": sum(p is not None for p in paired),
                                             "n_image_rows": int(mask.sum())}


def fit_crvlm(handle: ModelHandle, train: Sequence[Sample], config: CrvlmConfig | None = None,
              vector: SteeringVector | None = None, *, vector_train: Sequence[Sample] | None = None,
              cache_dir: str | Path | bool | None = None, log_path: str | Path | None = None,
              progress: bool = True) -> CalibratedSteering:
    """Fit CR-VLM on scoped training samples.

    Args:
        handle: The model.
        train: Samples with ``scope`` ``"in"`` or ``"out"`` (both needed).
        config: The fit's settings (:class:`~crvlm_core.methods.crvlm.config.CrvlmConfig`; default its defaults).
            With ``config.behavioural``, the behavioural fine-tune
            (:func:`~crvlm_core.methods.crvlm.behavioural.finetune_behavioural`) follows the activation losses.
        vector: The teacher-forced refusal vector ``s`` of the targets ``h + λ·s`` (fitted here when not given, on
            ``vector_train`` when given, else on ``train``: e.g. the main source's questions only, when a second
            source only teaches the scope).
        cache_dir: Where the calibrator's resume checkpoints go (``crvlm_core.core.cache`` convention; default none),
            keyed by the config and the training states: a fit killed midway resumes there to the same weights.
        log_path: A JSONL file that gets one line per training epoch as it runs (the history is also kept in the
            returned object's ``history`` and saved with it).
        progress: Show progress bars.

    On a VLM whose out-of-scope training samples have images (and some in-scope ones too), the vision-only
    counterfactual shift of each out-of-scope image sample (:func:`vision_counterfactual_shifts`) is passed to the
    calibrator, every training state of a sample carrying its sample's shift; ``info["vision_loss"]`` records whether
    the term was active and its final value. Text-only models and text-only data train without it.
    """
    config = config if config is not None else CrvlmConfig()
    start = time.perf_counter()
    layers = sorted({handle.check_layer(int(l)) for l in (config.layers or default_layers(handle))})
    gate_layer = default_gate_layer(handle) if config.gate_layer == "auto" else config.gate_layer
    if gate_layer is not None:
        gate_layer = handle.check_layer(int(gate_layer))
    gate_read = [] if gate_layer is None else sorted({gate_layer, *(handle.check_layer(int(l))
                                                                   for l in config.gate_extra_layers)})
    n_in, n_out = sum(s.scope == "in" for s in train), sum(s.scope == "out" for s in train)
    if not n_in or not n_out:
        raise ValueError(f"CR-VLM needs in- and out-of-scope training samples (got {n_in} in, {n_out} out)")
    if vector is None:  # from the plain questions
        vector = fit_vector(handle, train if vector_train is None else vector_train,
                            VectorConfig("teacher-forced", layers=layers), progress=progress)
    plain = list(train)
    # with framed copies: the calibrator's data, and the behavioural stage's unless the gate is a frozen probe
    train = plain + (_framed_copies(plain, config) if config.framing_augment else [])
    inn, out = _by_scope(train)  # what training_sets gives
    vector.check_compatible(handle.n_layers, handle.hidden_size)
    states = _training_states(handle, inn, out, layers, gate_read, config, progress)
    vision, vision_info = _vision_data(handle, inn, out, layers, vector, states, config, progress)
    cfg = config.calibrator_config(handle.hidden_size, layers, handle.hidden_size * len(gate_read) or None)
    run = TrainRun(cache_dir=cache_dir, log_path=log_path, progress=progress, model_spec=handle.spec,
                   n_model_layers=handle.n_layers, vector_fingerprint=vector.fingerprint)
    calibrator, history = train_calibrator(cfg, states["x_in"], states["x_out"], vector.directions[layers],
                                           states["gate_in"], states["gate_out"], vision, run)
    info = {"model": handle.spec, "model_key": handle.key, "target_scale": config.target_scale, "n_in": len(inn),
            "n_out": len(out), "train_positions": config.train_positions,
            "n_train_states": [len(states["x_in"]), len(states["x_out"])], "vector_method": vector.method,
            "vector_fingerprint": vector.fingerprint, "fit_seconds": time.perf_counter() - start,
            "final_losses": history[-1] if history else {}}
    if vision_info["active"]:
        vision_info["final"] = next((h["loss_vision"] for h in reversed(history) if "loss_vision" in h), None)
    info["vision_loss"] = vision_info
    steering = CalibratedSteering(calibrator, tuple(layers), gate_layer, info, vector, config=config, history=history,
                                  gate_pass=config.gate_pass, hard_gate=config.hard_gate,
                                  gate_extra_layers=tuple(l for l in gate_read if l != gate_layer),
                                  in_scope_push=config.in_scope_push)
    if config.behavioural is not None and config.behavioural.epochs > 0:
        # a probe gate is frozen: the behavioural stage only teaches the refusal, on the plain questions
        finetune_behavioural(steering, handle, plain if config.gate_fit == "probe" else train, config.behavioural,
                             progress=progress)
    return steering
