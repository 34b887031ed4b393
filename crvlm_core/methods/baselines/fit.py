"""Fitting a baseline: ``fit_baseline(model, train, BaselineConfig(...))`` returns a :class:`Baseline` in memory
(nothing is written); ``baseline.save(folder)`` writes its artifact. :func:`fit_or_load_baseline` reuses a folder
fitted from the same inputs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from crvlm_core.core.artifacts import ArtifactError, fingerprint, model_info, read_manifest
from crvlm_core.core.errors import InputError
from crvlm_core.data.schema import Sample
from crvlm_core.data.schema import fingerprint as samples_fingerprint
from crvlm_core.methods.baselines.artifact import KIND, Baseline, load_baseline
from crvlm_core.methods.baselines.config import VECTOR_METHODS, BaselineConfig
from crvlm_core.methods.baselines.lora import (ADAPTER_WEIGHTS, adapted_handle, adapter_files, adapter_tag,
                                               lora_targets, merge_adapter, train_lora)
from crvlm_core.methods.baselines.system_prompt import REFUSAL_TEXT, scope_system_prompt
from crvlm_core.methods.baselines.vector_baselines import fit_vector_baseline
from crvlm_core.models.handle import ModelHandle

__all__ = ["baseline_inputs", "fit_baseline", "fit_or_load_baseline"]


def baseline_inputs(handle: ModelHandle, train: Sequence[Sample], config: BaselineConfig) -> dict:
    """What a baseline fit depends on (its artifact's ``inputs``): the model, the training samples, the config."""
    return {"model": handle.key, "train": samples_fingerprint(train), "config": config.to_dict()}


def _fit_lora(handle: ModelHandle, train: list[Sample], config: BaselineConfig, progress: bool) -> Baseline:
    targets = lora_targets(handle, train, max_new_tokens=config.lora_target_tokens, batch_size=config.batch_size,
                           progress=progress)
    lora = config.lora()
    model, history = train_lora(handle, train, targets, lora, progress=progress)
    files = adapter_files(model)
    info = dict(rank=lora.rank, steps=lora.steps, lr=lora.lr, batch_size=lora.batch_size,
                target_tokens=config.lora_target_tokens, refusal=REFUSAL_TEXT, final_loss=history[-1]["loss"],
                lora_layers=sorted(model.peft_config["default"].layers_to_transform), history=history)
    used = adapted_handle(handle, merge_adapter(model), adapter_tag(files[ADAPTER_WEIGHTS]))
    return Baseline("lora", used, [], None, info, adapter=files)


def fit_baseline(handle: ModelHandle, train: Sequence[Sample], config: BaselineConfig,
                 progress: bool = True) -> Baseline:
    """Fit one baseline on scoped training samples (``scope`` set on each); nothing is written to disk but the
    caches. Save it with :meth:`Baseline.save`.

    Returns:
        The :class:`Baseline`, ready to evaluate (``info["fit_seconds"]`` records the fitting time).

    Raises:
        InputError: the training data lacks a scope the method needs.
    """
    method = config.method
    train = list(train)
    start = time.perf_counter()
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    if not out or (method in ("cast", "lora") and not inn):
        raise InputError(f"{method} needs {'in- and ' if method in ('cast', 'lora') else ''}out-of-scope training "
                         f"samples (got {len(inn)} in, {len(out)} out)")
    info: dict = {"method": method, "model": handle.spec, "n_in": len(inn), "n_out": len(out), "seed": config.seed}
    if method == "system-prompt":
        subjects = list(config.in_scope) if config.in_scope else sorted({s.subject for s in inn})
        system = scope_system_prompt(subjects)
        info.update(system=system, in_scope=subjects)
        fitted = Baseline(method, handle, [], system)
    elif method in VECTOR_METHODS:
        vector, iv, more = fit_vector_baseline(handle, train, config, progress)
        info.update(more)
        fitted = Baseline(method, handle, [iv], None, vector=vector)
    else:
        fitted = _fit_lora(handle, train, config, progress)
        info.update(fitted.info)
    info["fit_seconds"] = time.perf_counter() - start
    fitted.info, fitted.config, fitted.model = info, config, model_info(handle)
    fitted.inputs = baseline_inputs(handle, train, config)
    return fitted


def fit_or_load_baseline(handle: ModelHandle, train: Sequence[Sample], config: BaselineConfig, folder: str | Path,
                         progress: bool = True) -> Baseline:
    """The baseline in ``folder`` when it was fitted from the same model, samples and config; else fitted now and
    saved there (replacing what the folder held)."""
    train = list(train)
    try:
        same = read_manifest(folder, kinds=(KIND,))["inputs"] == fingerprint(baseline_inputs(handle, train, config))
    except ArtifactError:
        same = False
    if same:
        return load_baseline(folder, handle)
    fitted = fit_baseline(handle, train, config, progress)
    fitted.save(folder, force=True)
    return fitted
