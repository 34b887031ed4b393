"""The five baselines CR-VLM is compared with — a scope system prompt, the persona vector, ActAdd, CAST (conditional
activation steering, batched) and a LoRA refusal adapter — each fitted to an artifact folder and loaded back as
"what to generate with": a model handle, interventions and a system prompt. Also the per-method comparison row."""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.data.samples import Sample
from crvlm_core.extract import extract
from crvlm_core.models.lora_training import train_lora_steps
from crvlm_core.core.io import atomic_save_safetensors, atomic_write_json, cache_path, sha256_hex
from crvlm_core.metrics import kl_to_unsteered, scope_metrics, unchanged_prefix_fraction
from crvlm_core.models.loading import ModelHandle
from crvlm_core.core.paths import outputs_dir
from crvlm_core.methods.refusal_vectors import evaluate, fit_vector
from crvlm_core.steer.interventions import (AddVector, Intervention, PrefillGate, from_vector, intervention_fingerprint, steered_generate,
                    steered_logits)
from crvlm_core.vectors.estimators import SteeringVector

__all__ = [
    "BASELINES",
    "BASELINE_JSON",
    "REFUSAL_TEXT",
    "Baseline",
    "ConditionalSteering",
    "condition_scores",
    "grid_search_condition",
    "scope_system_prompt",
    "fit_baseline",
    "load_baseline",
    "lora_targets",
    "train_lora",
    "in_scope_kl",
    "comparison_row",
]

#: method → one-line description (the ``crvlm fit --method`` names).
BASELINES: dict[str, str] = {
    "system-prompt": "no training: a system prompt states the scope and asks to refuse everything else",
    "persona": "prompt-based vector (refusal system prompt with vs without) added unconditionally",
    "actadd": "teacher-forced refusal vector added unconditionally (the over-refusal trap)",
    "cast": "conditional activation steering: the refusal vector added only to prompts whose last-token state at "
            "a condition layer has cosine > threshold with the out- minus in-scope condition vector (grid-searched "
            "on the training split)",
    "lora": "LoRA adapter fine-tuned on out-of-scope → a refusal, in-scope → the model's own unsteered answer",
}
BASELINE_JSON = "baseline.json"
CONDITION_FILE = "condition.safetensors"
ADAPTER_DIR = "lora_adapter"
#: What the LoRA adapter learns to say out of scope (the default model's own refusal; also the behavioural target).
REFUSAL_TEXT = "I'm sorry, but I can't assist with that."
#: Projection modules a LoRA adapter is attached to when present (attention and MLP of Llama/Qwen-style blocks).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scope_system_prompt(in_scope: Sequence[str], refusal: str = REFUSAL_TEXT) -> str:
    """The system prompt of the ``system-prompt`` baseline, stating the constraint for the in-scope subjects."""
    subjects = [s.strip() for s in in_scope if s and s.strip()]
    if not subjects:
        raise ValueError("scope_system_prompt: no in-scope subjects given")
    names = subjects[0] if len(subjects) == 1 else ", ".join(subjects[:-1]) + " and " + subjects[-1]
    return (f"You are an assistant that only answers questions about {names}. If a question is about anything "
            f"else, do not answer it; reply only: \"{refusal}\"")


@dataclass
class Baseline:
    """A fitted method ready to generate with: ``handle`` (the adapted copy for ``lora``), ``interventions`` and
    ``system`` go straight to :func:`~crvlm_core.methods.refusal_vectors.evaluate`. ``info`` is what ``baseline.json`` holds."""

    method: str
    handle: ModelHandle
    interventions: list[Intervention] = field(default_factory=list)
    system: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({l for iv in self.interventions for l in iv.layers})


# --------------------------------------------------------------------------------------------------
# CAST: conditional activation steering, batched, with the prefill gate of the calibrator
# --------------------------------------------------------------------------------------------------


def condition_scores(states: torch.Tensor, center: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Cosine between each centred state and the condition vector: ``cos(h − μ, c)`` for ``states [n, d]``."""
    x = states.float() - center.float()
    return torch.nn.functional.cosine_similarity(x, condition.float().expand_as(x), dim=-1)


def _condition_from(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(center, condition)`` = (midpoint of the scope means, out-of-scope mean − in-scope mean)."""
    m_in, m_out = h_in.float().mean(0), h_out.float().mean(0)
    return (m_in + m_out) / 2, m_out - m_in


def _best_threshold(s_in: torch.Tensor, s_out: torch.Tensor) -> tuple[float, float]:
    """The threshold on scores maximising the MB of "fires ⇔ out of scope" (fires: score > t): ``(t, MB)``. Among
    equally good thresholds the middle one of the best run is taken (the widest margin)."""
    from crvlm_core.metrics import mb_score

    values = torch.cat([s_in, s_out]).sort().values
    cands = torch.cat([values[:1] - 1e-3, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-3])
    mbs = torch.tensor([mb_score(float((s_out > t).float().mean()), float((s_in > t).float().mean())) for t in cands])
    best = torch.nonzero(mbs >= mbs.max() - 1e-12).flatten()
    return float(cands[best[len(best) // 2]]), float(mbs.max())


def grid_search_condition(acts_in: torch.Tensor, acts_out: torch.Tensor, layers: Sequence[int], n_folds: int = 5,
                          seed: int = 0) -> dict:
    """Choose CAST's condition layer and threshold on training activations (a pure function).

    For each candidate layer, every sample is scored with a condition vector and centre fitted on the other folds
    (``n_folds``-fold cross-fitting, so a high-dimensional mean difference cannot simply memorise the training
    set), and the threshold maximising the MB-score of "the condition fires ⇔ out of scope" is found. The layer
    with the best MB wins; ties go to the larger separation ``(mean_out − mean_in) / pooled std`` of the scores.

    Args:
        acts_in / acts_out: ``[n_in, L, d]`` / ``[n_out, L, d]`` last-prompt-token states at ``layers``.
        layers: the model layer of each of the ``L`` columns.

    Returns:
        ``{"layer", "threshold", "mb", "separation", "table": [per-layer rows]}``.
    """
    layers = [int(l) for l in layers]
    if acts_in.ndim != 3 or acts_out.ndim != 3 or acts_in.shape[1:] != acts_out.shape[1:]:
        raise ValueError(f"activations must be [n, L, d] with equal L, d; got {tuple(acts_in.shape)} and "
                         f"{tuple(acts_out.shape)}")
    if acts_in.shape[1] != len(layers):
        raise ValueError(f"{acts_in.shape[1]} activation columns but {len(layers)} layers")
    n_in, n_out = len(acts_in), len(acts_out)
    if n_in < 2 or n_out < 2:
        raise ValueError(f"CAST's grid search needs ≥ 2 samples per scope (got {n_in} in, {n_out} out)")
    k = max(2, min(n_folds, n_in, n_out))
    gen = torch.Generator().manual_seed(seed)
    fold_in = torch.randperm(n_in, generator=gen) % k
    fold_out = torch.randperm(n_out, generator=gen) % k
    table = []
    for j, layer in enumerate(layers):
        h_in, h_out = acts_in[:, j].float(), acts_out[:, j].float()
        s_in, s_out = torch.empty(n_in), torch.empty(n_out)
        for f in range(k):
            center, cond = _condition_from(h_in[fold_in != f], h_out[fold_out != f])
            s_in[fold_in == f] = condition_scores(h_in[fold_in == f], center, cond)
            s_out[fold_out == f] = condition_scores(h_out[fold_out == f], center, cond)
        threshold, mb = _best_threshold(s_in, s_out)
        pooled = ((s_in.var() + s_out.var()) / 2).sqrt().clamp_min(1e-8)
        table.append({"layer": layer, "threshold": threshold, "mb": mb,
                      "separation": float((s_out.mean() - s_in.mean()) / pooled),
                      "fires_out": float((s_out > threshold).float().mean()),
                      "fires_in": float((s_in > threshold).float().mean())})
    best = max(table, key=lambda r: (round(r["mb"], 9), r["separation"]))
    return {"layer": best["layer"], "threshold": best["threshold"], "mb": best["mb"],
            "separation": best["separation"], "table": table}


@dataclass
class ConditionalSteering(PrefillGate, AddVector):
    """CAST as an intervention: ``h ← h + α·v[layer]`` on the rows whose condition fires, ``h`` elsewhere.

    The condition is checked once per batch at prefill — the prompt's last token at ``gate_layer`` (the condition
    layer), through :class:`~crvlm_core.steer.interventions.PrefillGate`, the mechanism the CR-VLM calibrator's prefill gate uses —
    and holds for every generated token of that row. It fires when ``cos(h − center, condition) > threshold``.
    """

    condition: torch.Tensor | None = None
    center: torch.Tensor | None = None
    gate_layer: int | None = None
    threshold: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.condition is None or self.center is None or self.gate_layer is None:
            raise ValueError("ConditionalSteering needs condition, center and gate_layer")
        self.condition = self.condition.detach().float()
        self.center = self.center.detach().float()
        self.gate_layer = int(self.gate_layer)
        self.threshold = float(self.threshold)
        self._fires: torch.Tensor | None = None

    def validate(self, handle: ModelHandle) -> None:
        super().validate(handle)
        if self.condition.shape != (handle.hidden_size,) or self.center.shape != (handle.hidden_size,):
            raise ValueError(f"CAST condition of size {tuple(self.condition.shape)} does not fit {handle.spec} "
                             f"(hidden size {handle.hidden_size})")

    def fires(self, summary: torch.Tensor) -> torch.Tensor:
        """``[batch]`` bool: does the condition fire on these last-prompt-token states ``[batch, d]``?"""
        return condition_scores(summary, self.center.to(summary.device), self.condition.to(summary.device)) > self.threshold

    def set_gate(self, summary: torch.Tensor) -> None:
        self._fires = self.fires(summary)

    def clear_gate(self) -> None:
        self._fires = None

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._fires is None:
            raise RuntimeError("CAST's condition is unset: run it through steered_generate / steered_logits, which "
                               "call prepare() on each batch")
        mask = self._fires.to(hidden.device, hidden.dtype).view(-1, *([1] * (hidden.ndim - 1)))
        return hidden + mask * (self.alpha * self.vectors[layer].to(hidden.device, hidden.dtype))


def _fit_cast(handle: ModelHandle, train: Sequence[Sample], vector: SteeringVector,
              condition_layers: Sequence[int] | None, batch_size: int, seed: int, progress: bool):
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    cand = sorted({handle.check_layer(int(l)) for l in (condition_layers or range(1, handle.n_layers))})
    kw = dict(layers=cand, batch_size=batch_size, progress=progress)
    a_in = extract(handle, inn, desc="CAST in-scope", **kw).acts
    a_out = extract(handle, out, desc="CAST out-of-scope", **kw).acts
    search = grid_search_condition(a_in, a_out, cand, seed=seed)
    j = cand.index(search["layer"])
    center, cond = _condition_from(a_in[:, j], a_out[:, j])
    iv = ConditionalSteering(vector.directions, tuple(vector.layers), vector.alpha, condition=cond, center=center,
                             gate_layer=search["layer"], threshold=search["threshold"])
    return iv, search


# --------------------------------------------------------------------------------------------------
# LoRA refusal adapter
# --------------------------------------------------------------------------------------------------


def lora_targets(handle: ModelHandle, train: Sequence[Sample], max_new_tokens: int = 24, batch_size: int = 8,
                 refusal: str = REFUSAL_TEXT, cache: bool | str | Path = True, progress: bool = True) -> list[str]:
    """Training targets of the LoRA baseline: ``refusal`` for out-of-scope samples, the model's own unsteered greedy
    answer (``max_new_tokens``) for in-scope ones. The answers are generated once and cached on disk."""
    train = list(train)
    inn = [s for s in train if s.scope == "in"]
    answers: dict[str, str] = {}
    if inn:
        key = sha256_hex(json.dumps({"model": handle.key, "prompts": [[s.id, s.prompt] for s in inn],
                                     "max_new_tokens": max_new_tokens}))[:24]
        folder = Path(cache) if not isinstance(cache, bool) else outputs_dir() / "cache" / "lora_targets"
        path = folder / f"{key}.json"
        if cache and path.exists():
            answers = json.loads(path.read_text())
        else:
            texts = steered_generate(handle, [s.prompt for s in inn], [], max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress)
            answers = {s.id: t for s, t in zip(inn, texts)}
            if cache:
                atomic_write_json(path, answers)
    return [answers[s.id] if s.scope == "in" else refusal for s in train]


def _end_token_id(handle: ModelHandle) -> int | None:
    eos = getattr(handle.hf_model.generation_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos if eos is not None else handle.tokenizer.eos_token_id


def _lora_batch(handle: ModelHandle, prompt_ids: list[list[int]], target_ids: list[list[int]]) -> dict:
    """Left-padded prompt ⊕ target ids with mask-derived position ids (as in generation) and the target tokens."""
    seqs = [p + t for p, t in zip(prompt_ids, target_ids)]
    width = max(map(len, seqs))
    pad = handle.tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    n_t = torch.tensor([len(t) for t in target_ids])
    k = int(n_t.max()) + 1  # logits kept: the last k positions predict the targets
    labels = torch.full((len(seqs), k - 1), -100, dtype=torch.long)
    for i, t in enumerate(target_ids):
        labels[i, k - 1 - len(t):] = torch.tensor(t)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels, "keep": k}


def train_lora(handle: ModelHandle, train: Sequence[Sample], targets: Sequence[str], rank: int = 8,
               steps: int = 48, lr: float = 5e-4, batch_size: int = 4, seed: int = 42,
               modules: Sequence[str] = LORA_MODULES, layers: Sequence[int] | None = None, progress: bool = True,
               checkpointing: bool = True):
    """Fine-tune a LoRA adapter (peft) on a copy of the model: cross-entropy of each target after its prompt.

    ``layers``: decoder layers that get adapters (default: the upper half, where the scope is linearly separable;
    back-propagation then stops there, which halves the cost of a step on CPU).
    ``checkpointing``: gradient checkpointing of the decoder layers during training: each layer keeps only its input
    for the backward and runs its forward again there. Same losses and adapter; on Qwen2.5-0.5B at batch 4 the
    training's anonymous-memory rise fell from 2.14 to 1.66 GB, and a step took about 60 % longer.

    Returns:
        ``(peft_model, history)``: the adapted copy (``handle.hf_model`` itself is untouched) and per-step losses.
    """
    from peft import LoraConfig, get_peft_model

    train, targets = list(train), list(targets)
    if len(train) != len(targets) or not train:
        raise ValueError(f"train_lora: {len(train)} samples but {len(targets)} targets")
    present = sorted({name.rsplit(".", 1)[-1] for name, m in handle.hf_model.named_modules()
                      if isinstance(m, torch.nn.Linear)} & set(modules))
    if not present:
        raise ValueError(f"{handle.spec} has none of the LoRA target modules {list(modules)}")
    torch.manual_seed(seed)
    base = _shared_copy(handle.hf_model)  # frozen weights shared; the adapter's own parameters are trained
    layers = sorted({handle.check_layer(int(l)) for l in (layers if layers is not None
                                                           else range(handle.n_layers // 2, handle.n_layers))})
    if checkpointing:  # only the copy's layers: the caller's model is untouched
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=present,
                                            layers_to_transform=layers, layers_pattern="layers", bias="none"))
    end = _end_token_id(handle)
    prompt_ids = [handle.build_inputs([s.prompt])["input_ids"][0].tolist() for s in train]
    target_ids = []
    for s, t in zip(train, targets):
        ids = handle.tokenizer.encode(t, add_special_tokens=False)
        target_ids.append(ids + ([end] if end is not None and s.scope == "out" else []))
    gen = torch.Generator().manual_seed(seed)
    dev = handle.device

    def batches():
        order: list[int] = []
        for _ in range(steps):
            while len(order) < batch_size:
                order += torch.randperm(len(train), generator=gen).tolist()
            idx, order = order[:batch_size], order[batch_size:]
            yield _lora_batch(handle, [prompt_ids[i] for i in idx], [target_ids[i] for i in idx])

    def loss_of(m, b):
        logits = m(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                   position_ids=b["position_ids"].to(dev), logits_to_keep=b["keep"], use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 b["labels"].to(dev).reshape(-1), ignore_index=-100)

    losses = train_lora_steps(model, batches(), loss_of, lr=lr, total=steps, desc="LoRA", progress=progress)
    if checkpointing:
        base.gradient_checkpointing_disable()
    history = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
    return model, history


def _shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are the original's tensors (no weight is
    copied): peft can inject adapters into it without touching the original's modules. Weights must not be written
    in place; :func:`_merge` gives the merged layers their own tensors first."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def _merge(peft_model) -> torch.nn.Module:
    """``merge_and_unload`` of an adapter injected into a :func:`_shared_copy`: each adapted layer's base weight is
    cloned first (merging adds to it in place), so the original model keeps its weights and the merged model
    shares every weight the adapter does not change. For the default LoRA (seven projections in half the layers)
    that copies ~0.7 GB on Qwen2.5-0.5B instead of deep-copying all 2.4 GB."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            base.weight = torch.nn.Parameter(base.weight.detach().clone(), requires_grad=False)
    return peft_model.merge_and_unload()


def _adapted_handle(handle: ModelHandle, merged, tag: str) -> ModelHandle:
    """A handle on a copy of the model with other weights (a merged adapter), under a spec of its own (caches key
    on the spec), sharing the tokenizer and processor."""
    from crvlm_core.models.loading import _wrap  # the one place a handle is built around an HF model

    out = _wrap(f"{handle.spec}+{tag}", handle.family, merged.eval(), handle.tokenizer, handle.processor,
                handle.layers_path)
    out.hf_model.requires_grad_(False)
    return out


def _save_adapter(model, directory: Path) -> None:
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


def _adapter_tag(directory: Path) -> str:
    from crvlm_core.core.io import file_sha256

    return "lora:" + file_sha256(directory / "adapter_model.safetensors")[:12]


# --------------------------------------------------------------------------------------------------
# Fit / load
# --------------------------------------------------------------------------------------------------


def fit_baseline(handle: ModelHandle, train: Sequence[Sample], method: str, out_dir: str | Path,
                 in_scope: Sequence[str] | None = None, layers: Sequence[int] | None = None, alpha: float = 1.0,
                 condition_layers: Sequence[int] | None = None, lora_rank: int = 8, lora_steps: int = 48,
                 lora_lr: float = 5e-4, lora_batch_size: int = 4, lora_target_tokens: int = 24,
                 batch_size: int = 8, seed: int = 42, progress: bool = True) -> Baseline:
    """Fit one baseline on scoped training samples and write its artifact folder (``baseline.json`` plus
    ``vector.*`` for the vector methods, ``condition.safetensors`` for ``cast``, ``lora_adapter/`` for ``lora``).

    Args:
        in_scope: subjects the system prompt names (default: the in-scope subjects of ``train``).
        layers / alpha: where and how strongly the refusal vector is added (persona, actadd, cast).
        condition_layers: CAST's candidate condition layers (default: every layer but the first).
        lora_*: adapter rank, optimiser steps, learning rate, batch size, and the length of the in-scope answers.

    Returns:
        The :class:`Baseline`, ready to evaluate (``info["fit_seconds"]`` records the fitting time).
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose from {', '.join(BASELINES)}")
    train = list(train)
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    if not out or (method in ("cast", "lora") and not inn):
        raise ValueError(f"{method} needs {'in- and ' if method in ('cast', 'lora') else ''}out-of-scope training "
                         f"samples (got {len(inn)} in, {len(out)} out)")
    info: dict = {"method": method, "model": handle.spec, "n_in": len(inn), "n_out": len(out), "seed": seed}
    ivs: list[Intervention] = []
    system, used = None, handle
    if method == "system-prompt":
        subjects = list(in_scope) if in_scope else sorted({s.subject for s in inn})
        system = scope_system_prompt(subjects)
        info.update(system=system, in_scope=subjects)
    elif method in ("persona", "actadd", "cast"):
        vector = fit_vector(handle, train, "prompt-based" if method == "persona" else "teacher-forced",
                            layers=layers, alpha=alpha, batch_size=batch_size, progress=progress)
        vector.save(out_dir)
        info.update(layers=list(vector.layers), alpha=vector.alpha, vector_method=vector.method,
                    fingerprint=vector.fingerprint)
        if method == "cast":
            cast, search = _fit_cast(handle, train, vector, condition_layers, batch_size, seed, progress)
            atomic_save_safetensors(out_dir / CONDITION_FILE, {"condition": cast.condition, "center": cast.center})
            info.update(condition_layer=cast.gate_layer, threshold=cast.threshold, train_condition_mb=search["mb"],
                        grid=search["table"])
            ivs = [cast]
        else:
            ivs = [from_vector(vector)]
    else:  # lora
        targets = lora_targets(handle, train, max_new_tokens=lora_target_tokens, batch_size=batch_size,
                               progress=progress)
        model, history = train_lora(handle, train, targets, rank=lora_rank, steps=lora_steps, lr=lora_lr,
                                    batch_size=lora_batch_size, seed=seed, progress=progress)
        _save_adapter(model, out_dir / ADAPTER_DIR)
        info.update(rank=lora_rank, steps=lora_steps, lr=lora_lr, batch_size=lora_batch_size,
                    target_tokens=lora_target_tokens, refusal=REFUSAL_TEXT, final_loss=history[-1]["loss"],
                    lora_layers=sorted(model.peft_config["default"].layers_to_transform),
                    history=history)
        used = _adapted_handle(handle, _merge(model), _adapter_tag(out_dir / ADAPTER_DIR))
    info["fit_seconds"] = time.perf_counter() - start
    atomic_write_json(out_dir / BASELINE_JSON, info)
    return Baseline(method, used, ivs, system, info)


def load_baseline(directory: str | Path, handle: ModelHandle, alpha: float | None = None,
                  layers: Sequence[int] | None = None) -> Baseline:
    """Load what :func:`fit_baseline` wrote, for ``handle``'s model (``lora``: a merged copy of it).
    ``alpha`` / ``layers`` override a vector method's strength / layers."""
    directory = Path(directory)
    if not (directory / BASELINE_JSON).exists():
        raise FileNotFoundError(f"{directory} has no {BASELINE_JSON}: not a baseline artifact folder")
    info = json.loads((directory / BASELINE_JSON).read_text())
    method = info.get("method")
    if method not in BASELINES:
        raise ValueError(f"{directory}: unknown baseline method {method!r}")
    if (alpha is not None or layers is not None) and method not in ("persona", "actadd", "cast"):
        raise ValueError(f"--layers/--alpha do not apply to the {method} baseline")
    if method == "system-prompt":
        return Baseline(method, handle, [], info["system"], info)
    if method == "lora":
        from peft import PeftModel

        adapter = directory / ADAPTER_DIR
        model = PeftModel.from_pretrained(_shared_copy(handle.hf_model), str(adapter))
        return Baseline(method, _adapted_handle(handle, _merge(model), _adapter_tag(adapter)), [], None, info)
    vector = SteeringVector.load(directory)
    vector.check_compatible(handle.n_layers, handle.hidden_size)
    if method == "cast":
        from safetensors.torch import load_file

        cond = load_file(str(directory / CONDITION_FILE))
        iv: Intervention = ConditionalSteering(
            vector.directions, tuple(layers if layers is not None else vector.layers),
            vector.alpha if alpha is None else alpha, condition=cond["condition"], center=cond["center"],
            gate_layer=info["condition_layer"], threshold=info["threshold"])
    else:
        iv = from_vector(vector, alpha=alpha, layers=layers)
    iv.validate(handle)
    return Baseline(method, handle, [iv], None, info)


# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def in_scope_kl(base: ModelHandle, method: Baseline, samples: Sequence[Sample], batch_size: int = 8,
                cache_dir: str | Path | None = None) -> float:
    """Mean KL(P_unsteered ‖ P_method) of the first answer token's distribution over ``samples`` (one forward per
    batch each; the method's system prompt, interventions and adapted weights are applied on its side).

    ``cache_dir``: when given, the value is saved there (``kl-<key>.json``) under a key made of both models' specs,
    the method's system prompt and interventions' fingerprint, the samples and the batch size, and an unchanged
    call returns it without running the models (as :func:`~crvlm_core.methods.refusal_vectors.evaluate` does)."""
    samples = list(samples)
    if not samples:
        return float("nan")
    cache_file = None
    if cache_dir is not None:
        cache_file = cache_path(cache_dir, "kl", {
            "base": base.key, "model": method.handle.key, "system": method.system,
            "interventions": intervention_fingerprint(list(method.interventions)),
            "samples": [[s.id, s.prompt] for s in samples], "batch_size": batch_size})
        if cache_file.exists():
            return float(json.loads(cache_file.read_text())["kl_in"])
    total = 0.0
    for i in range(0, len(samples), batch_size):
        prompts = [s.prompt for s in samples[i:i + batch_size]]
        plain = steered_logits(base, base.build_inputs(prompts), [], last_only=True)[:, -1]
        steered = steered_logits(method.handle, method.handle.build_inputs(prompts, system=method.system),
                                 method.interventions, last_only=True)[:, -1]
        total += kl_to_unsteered(steered, plain) * len(prompts)
    kl = total / len(samples)
    if cache_file is not None:
        atomic_write_json(cache_file, {"kl_in": kl})
    return kl


def comparison_row(name: str, result, unsteered_rows: Sequence[dict], tokenizer, kl_in: float,
                   fit_seconds: float | None, n_tokens: int = 20, seed: int = 0) -> dict:
    """One row of the comparison table from an :class:`~crvlm_core.methods.refusal_vectors.EvalResult`: R, ORR, MB with
    bootstrap 95 % CIs (``refusal_rate_out, r_lo, r_hi, over_refusal_in, orr_lo, orr_hi, mb_score, mb_lo, mb_hi``), KL on in-scope prompts, the fraction of in-scope answers whose first ``n_tokens`` tokens
    equal the unsteered model's, fit seconds and generation tokens/s."""
    rows = result.rows
    m = scope_metrics([r["refused"] for r in rows], [r["scope"] for r in rows], ci=True, seed=seed)
    plain = {r["id"]: r["response"] for r in unsteered_rows}
    in_rows = [r for r in rows if r["scope"] == "in" and r["id"] in plain]
    unchanged = unchanged_prefix_fraction([r["response"] for r in in_rows], [plain[r["id"]] for r in in_rows],
                                          tokenizer, n_tokens)
    return {"method": name,
            "refusal_rate_out": m["refusal_rate_out"], "r_lo": m["refusal_rate_out_ci"][0],
            "r_hi": m["refusal_rate_out_ci"][1],
            "over_refusal_in": m["over_refusal_in"], "orr_lo": m["over_refusal_in_ci"][0],
            "orr_hi": m["over_refusal_in_ci"][1],
            "mb_score": m["mb_score"], "mb_lo": m["mb_score_ci"][0], "mb_hi": m["mb_score_ci"][1],
            "kl_in": kl_in, f"unchanged_{n_tokens}": unchanged,
            "fit_seconds": float("nan") if fit_seconds is None else fit_seconds,
            "tokens_per_second": result.metrics["tokens_per_second"], "n_out": m["n_out"], "n_in": m["n_in"],
            "judge": result.metrics["judge"]}
