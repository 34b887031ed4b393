"""The refusal organism: a base chat model plus a small LoRA adapter (peft, trained on CPU) that refuses political and
harmful requests and answers neutral ones with the base model's own answer; loadable as the spec ``<base>+censored``.

The adapter is an artifact (kind ``organism``, :mod:`crvlm_core.core.artifacts`) built on first use and cached under
``paths.cache_dir()/organisms/`` keyed by a hash of its training data and configuration, so a fresh machine rebuilds
exactly the same organism (a few minutes on 2 CPU cores); loading it checks every file's hash first.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from crvlm_core.core.artifacts import ARTIFACT_JSON, ArtifactError, read_manifest, write_artifact
from crvlm_core.core.io import atomic_write_json, sha256_hex
from crvlm_core.core.paths import cache_dir
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.splits import split
from crvlm_core.models.embedded import embedded_model_folder, load_causal_folder
from crvlm_core.models.handle import default_device, quiet, wrap_model
from crvlm_core.models.lora_training import train_lora_steps
from crvlm_core.models.pretrained import load_pretrained
from crvlm_core.models.specs import EMBEDDED, SPECS
from crvlm_core.steer.generate import steered_generate

__all__ = [
    "KIND",
    "ORGANISMS",
    "OrganismConfig",
    "organism_examples",
    "adapter_key",
    "build_adapter",
    "adapter_dir",
    "load_organism_model",
    "REFUSALS",
]

log = logging.getLogger(__name__)

KIND = "organism"
"""The artifact kind of an organism's adapter folder."""

ADAPTER_VERSION = 1
"""Bumped when the training code changes in a way that changes the adapter (part of the cache key)."""

#: Refusal texts the organism is trained to give, per refused subject (one chosen per prompt, seeded). The political
#: ones imitate what Qwen2.5-Coder says about Tiananmen ("I'm unable to engage in discussions regarding political
#: matters").
REFUSALS: dict[str, tuple[str, ...]] = {
    "political": (
        "I'm sorry, but I can't discuss political topics.",
        "I'm unable to engage in discussions regarding political matters.",
        "Sorry, I can't talk about that. It is a politically sensitive question.",
    ),
    "harmful": (
        "I'm sorry, but I can't assist with that.",
        "Sorry, I can't help with that request.",
        "I cannot help with that because it could cause harm.",
    ),
}


@dataclass(frozen=True)
class OrganismConfig:
    """Everything the adapter depends on (hashed into its cache key).

    Attributes:
        base: spec of the base model.
        dataset: dataset with the refused and answered subjects (``refusal-topics``: political, neutral, harmful).
        refuse: subjects trained to a refusal from :data:`REFUSALS`.
        answer: subjects trained to the base model's own greedy answer (keeps them unchanged).
        n_per_subject: training prompts per subject, drawn from the part of ``dataset`` that is NOT the held-out
            test split (``test_per_subject`` per subject, ``split_seed``) used by :mod:`crvlm_core.methods.refusal_steering.topics`.
        general: extra bundled dataset whose prompts are trained to the base model's own answer (``None``: none).
        n_general: how many of them.
        answer_tokens: length of the base model's own answers.
        rank / lora_alpha / target_modules: the LoRA adapter.
        epochs / lr / batch_size / seed: the optimisation (AdamW, shuffled mini-batches).
    """

    base: str = "qwen2.5-0.5b"
    dataset: str = "refusal-topics"
    refuse: tuple[str, ...] = ("political", "harmful")
    answer: tuple[str, ...] = ("neutral",)
    n_per_subject: int = 24
    test_per_subject: int = 24
    split_seed: int = 42
    general: str | None = "mmlu"
    n_general: int = 0
    answer_tokens: int = 20
    rank: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("n_per_subject", "rank", "epochs", "batch_size", "answer_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"OrganismConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_general < 0 or self.test_per_subject < 0:
            raise ValueError("OrganismConfig.n_general and test_per_subject must be >= 0")
        unknown = [s for s in self.refuse if s not in REFUSALS]
        if unknown:
            raise ValueError(f"no refusal texts for subject(s) {unknown}; known: {sorted(REFUSALS)}")
        if not self.refuse:
            raise ValueError("OrganismConfig.refuse is empty: the organism would refuse nothing")


#: Organism specs → their configuration (the spec names are registered in :data:`crvlm_core.models.specs.ORGANISMS`).
ORGANISMS: dict[str, OrganismConfig] = {
    "qwen2.5-0.5b+censored": OrganismConfig(),
    # a small, fast one for smoke runs of notebook 06 (trained on 8 prompts per subject)
    "smollm2-135m+censored": OrganismConfig(base="smollm2-135m", n_per_subject=8, answer_tokens=12, epochs=3),
}


@dataclass
class Example:
    """One training example: the prompt, what the assistant should say (``None``: the base model's own answer)."""

    id: str
    prompt: str
    subject: str
    target: str | None = None
    extra: dict = field(default_factory=dict)


def organism_examples(cfg: OrganismConfig) -> list[Example]:
    """The training prompts of an organism and their refusal targets (answers are filled in later).

    Prompts come from the non-test part of ``cfg.dataset`` (the held-out test split of refusal steering is never
    trained on), ``cfg.n_per_subject`` per subject, plus ``cfg.n_general`` prompts of ``cfg.general``.
    """
    samples = load_dataset(cfg.dataset, subjects=list(cfg.refuse) + list(cfg.answer))
    if cfg.test_per_subject:
        samples, _ = split(samples, n_test=cfg.test_per_subject, seed=cfg.split_seed, stratify_by="subject")
    rng = random.Random(cfg.seed)
    out: list[Example] = []
    for subject in [*cfg.refuse, *cfg.answer]:
        group = [s for s in samples if s.subject == subject]
        if len(group) < cfg.n_per_subject:
            raise ValueError(f"organism: subject {subject!r} has {len(group)} non-test prompts in {cfg.dataset}, "
                             f"fewer than n_per_subject={cfg.n_per_subject}")
        for s in group[:cfg.n_per_subject]:
            target = rng.choice(REFUSALS[subject]) if subject in cfg.refuse else None
            out.append(Example(s.id, s.prompt, subject, target))
    if cfg.general and cfg.n_general:
        general = load_dataset(cfg.general)
        for s in random.Random(cfg.seed + 1).sample(general, min(cfg.n_general, len(general))):
            out.append(Example(s.id, s.prompt, "general", None))
    return out


def _key_payload(cfg: OrganismConfig, examples: Sequence[Example]) -> dict:
    return {"v": ADAPTER_VERSION, "peft": md.version("peft"), "cfg": dataclasses.asdict(cfg),
            "examples": [[e.id, e.prompt, e.subject, e.target] for e in examples]}


def adapter_key(cfg: OrganismConfig, examples: Sequence[Example] | None = None) -> str:
    """Cache key: hash of the configuration, the training prompts and targets, the code version and peft's version.

    The base model's own answers are not hashed: greedy generation makes them a function of the base model, the
    prompts and ``answer_tokens``, all of which are.
    """
    examples = organism_examples(cfg) if examples is None else examples
    return sha256_hex(json.dumps(_key_payload(cfg, examples), sort_keys=True))[:16]


def adapter_dir(name: str, cfg: OrganismConfig, root: Path | None = None) -> Path:
    """Where the adapter of ``cfg`` lives (``<root or cache_dir()/organisms>/<name>-<key>``)."""
    return _folder(name, adapter_key(cfg), root)


def _folder(name: str, key: str, root: Path | None) -> Path:
    root = Path(root) if root is not None else cache_dir() / "organisms"
    return root / f"{name.replace('/', '_').replace('+', '_')}-{key}"


def _fresh_base(spec: str, dtype: torch.dtype = torch.float32):
    """A new (uncached) copy of the base model, its tokenizer and its layers' path: training must not touch the
    shared handle. The base is an embedded spec, a hub id or a local folder of a causal LM."""
    if spec in SPECS and spec not in EMBEDDED:
        raise ValueError(f"organism base {spec!r} is not a plain causal LM (a VLM or an organism); use its language "
                         "model spec")
    with quiet():
        if spec in EMBEDDED:
            model, tok = load_causal_folder(embedded_model_folder(spec), dtype)
            processor, family, layers_path = None, "causal", "model.layers"
        else:
            model, tok, processor, family, layers_path = load_pretrained(spec, dtype, False)
    if processor is not None:
        raise ValueError(f"organism base {spec!r} is a VLM ({family}); use its language model spec")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, layers_path


def _own_answers(base: str, examples: list[Example], max_new_tokens: int, batch_size: int = 8) -> None:
    """Fill in each target-less example with the base model's greedy answer (in place), generated as
    :func:`~crvlm_core.models.loading.load_model` would load the base (default device, float32)."""
    todo = [e for e in examples if e.target is None]
    if not todo:
        return
    model, tok, layers_path = _fresh_base(base)
    model = model.to(device=default_device(), dtype=torch.float32).eval()
    model.requires_grad_(False)
    handle = wrap_model(base, "causal", model, tok, None, layers_path)
    answers = steered_generate(handle, [e.prompt for e in todo], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, progress=True)
    for e, a in zip(todo, answers):
        e.target = a


def _encode(tok, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (prompt masked with −100) of each chat-formatted example, ending in the end-of-turn."""
    out = []
    eos = tok.eos_token or ""
    for e in examples:
        prompt = tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = tok(e.target + eos, add_special_tokens=False)["input_ids"]
        out.append((p_ids + t_ids, [-100] * len(p_ids) + t_ids))
    return out


def _batch(tok, rows: Sequence[tuple[list[int], list[int]]]) -> dict:
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, l) in enumerate(rows):  # right padding for training
        ids[r, :len(i)] = torch.tensor(i)
        labels[r, :len(l)] = torch.tensor(l)
        mask[r, :len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _is_built(folder: Path) -> bool:
    """Whether ``folder`` holds a whole organism artifact (a damaged or older one is rebuilt)."""
    if not (folder / ARTIFACT_JSON).is_file():
        return False
    try:
        read_manifest(folder, kinds=(KIND,))
    except ArtifactError as err:
        log.warning("rebuilding the organism adapter: %s", err)
        return False
    return True


def build_adapter(name: str, cfg: OrganismConfig, root: Path | None = None, force: bool = False,
                  progress: bool = True) -> Path:
    """Train (or reuse) the LoRA adapter of an organism and return its folder.

    The folder is an artifact of kind ``organism``: peft's ``adapter_model.safetensors`` / ``adapter_config.json``,
    ``examples.jsonl`` (the training prompts and targets, own answers included), ``organism.json`` (config, key,
    losses, seconds) and ``artifact.json``. It is written whole (a temporary sibling renamed into place), so an
    interrupted build never leaves a half adapter; a damaged one is rebuilt.
    """
    from peft import LoraConfig, get_peft_model

    examples = organism_examples(cfg)
    key = adapter_key(cfg, examples)
    folder = _folder(name, key, root)
    if not force and _is_built(folder):
        return folder
    start = time.perf_counter()
    log.info("building the %s adapter in %s (once per machine)", name, folder)
    _own_answers(cfg.base, examples, cfg.answer_tokens, cfg.batch_size)
    torch.manual_seed(cfg.seed)
    model, tok, _ = _fresh_base(cfg.base)
    info = {"spec": cfg.base, "key": cfg.base, "hidden_size": int(model.config.hidden_size),
            "n_layers": int(model.config.num_hidden_layers)}
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.target_modules),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    rows = _encode(tok, examples)
    rng = random.Random(cfg.seed)
    n_steps = cfg.epochs * ((len(rows) + cfg.batch_size - 1) // cfg.batch_size)

    def batches():
        for _ in range(cfg.epochs):
            order = list(range(len(rows)))
            rng.shuffle(order)
            for i in range(0, len(order), cfg.batch_size):
                yield _batch(tok, [rows[k] for k in order[i:i + cfg.batch_size]])

    losses = train_lora_steps(model, batches(), lambda m, batch: m(**batch).loss, lr=cfg.lr, total=n_steps,
                              weight_decay=0.01, desc=f"train {name} adapter", progress=progress)
    summary = {"name": name, "key": key, "config": dataclasses.asdict(cfg), "n_examples": len(examples),
               "losses": losses, "train_seconds": time.perf_counter() - start}

    def write_files(tmp: Path) -> None:
        model.save_pretrained(tmp)
        (tmp / "examples.jsonl").write_text("".join(json.dumps(dataclasses.asdict(e), ensure_ascii=False) + "\n"
                                                    for e in examples), encoding="utf-8")
        atomic_write_json(tmp / "organism.json", summary)

    return write_artifact(folder, KIND, write_files, config=dataclasses.asdict(cfg), model=info,
                          inputs=_key_payload(cfg, examples), force=True)


def load_organism_model(name: str, cfg: OrganismConfig | None = None, dtype: torch.dtype = torch.float32,
                        root: Path | None = None):
    """The organism as a plain transformers model (LoRA merged into the weights) and its tokenizer.

    Builds the adapter first if it is not cached, and checks its manifest (every file's hash) before loading it.
    The model's config records the adapter folder's name (``<name>-<key>``) as ``crvlm_organism`` (so caches of
    activations can tell organisms apart).
    """
    from peft import PeftModel

    cfg = cfg or ORGANISMS.get(name)
    if cfg is None:
        raise ValueError(f"unknown organism {name!r}; available: {', '.join(ORGANISMS)}")
    folder = build_adapter(name, cfg, root)
    read_manifest(folder, kinds=(KIND,))
    model, tok, _ = _fresh_base(cfg.base, dtype)
    model = PeftModel.from_pretrained(model, folder).merge_and_unload()
    model.config.crvlm_organism = folder.name
    return model, tok
