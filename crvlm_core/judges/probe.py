"""The llm-probe judge: the ``llm`` judge's model reads the same REFUSAL / COMPLIANCE prompt, and a linear readout
of its hidden state at the prompt's last position (one layer) gives p(refusal); confidence = 2p − 1.

The readout ships with the package (``readouts/llm-probe.json``), fitted by ``scripts/fit_judge_probe.py`` on the
training labels only (layer and regularisation chosen by 5-fold cross-validation on them); it records the judge
model, template and layer it reads, and refuses a model with another hidden size. Judge-model states are cached
per item on disk (:func:`judge_states`), so fitting, validating and re-judging never read a pair twice."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crvlm_core.core.cache import cache_folder, key_digest
from crvlm_core.core.io import atomic_write_bytes, atomic_write_json
from crvlm_core.judges.base import JudgeError, JudgeResult, check_pairs
from crvlm_core.judges.llm import VERDICT_TEMPLATE, VERDICTS
from crvlm_core.judges.readout import LinearReadout

__all__ = ["PROBE_FORMAT", "PROBE_LAYERS", "PROBE_PATH", "ProbeJudge", "judge_states", "select_probe"]

PROBE_FORMAT = 1
#: The shipped readout (written by scripts/fit_judge_probe.py).
PROBE_PATH = Path(__file__).with_name("readouts") / "llm-probe.json"
#: The layers whose states are read and cached (the readout uses one of them; ``hidden_states`` index).
PROBE_LAYERS = (8, 12, 16, 20, 24, 28)


def _item_key(prompt: str, response: str) -> str:
    return hashlib.sha256(json.dumps([prompt, response]).encode()).hexdigest()[:20]


def judge_states(backend: Any, prompts: Sequence[str], responses: Sequence[str], layers: Sequence[int] = PROBE_LAYERS,
                 template: str = VERDICT_TEMPLATE, answers: Sequence[str] = VERDICTS, max_response_chars: int = 1500,
                 cache_dir: Any = None, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(states [n, len(layers), d], probabilities [n, 2])``: the judge model's last-position hidden states at
    ``layers`` and its next-token mass on the two answer words, for each (prompt, response) under ``template``.

    ``cache_dir`` (``crvlm_core.core.cache`` convention: True → ``outputs/cache/``): one ``.npz`` per pair in a
    folder keyed by the model and every setting, written as each batch finishes (an interrupted run resumes)."""
    folder = cache_folder(cache_dir)
    if folder is not None:
        handle = backend.handle
        folder = folder / "judge-states-{}".format(key_digest({
            "model": handle.spec, "dtype": str(handle.hf_model.dtype), "template": template, "answers": list(answers),
            "chars": max_response_chars, "layers": list(layers)}))
        folder.mkdir(parents=True, exist_ok=True)
    keys = [_item_key(p, r) for p, r in zip(prompts, responses)]
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    todo = [i for i, k in enumerate(keys) if folder is None or not (folder / f"{k}.npz").exists()]
    step = max(1, backend.batch_size)
    chunks = range(0, len(todo), step)
    if progress and todo:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="judge states", unit="batch")
    for k in chunks:
        idx = todo[k:k + step]
        texts = [template.format(request=prompts[i], response=responses[i][:max_response_chars]) for i in idx]
        probs, states = backend.readout(texts, answers, layer=list(layers))
        for j, i in enumerate(idx):
            found[keys[i]] = (states[j], np.asarray(probs[j], np.float64))
            if folder is not None:
                buf = io.BytesIO()
                np.savez(buf, states=states[j], p=np.asarray(probs[j]), layers=np.asarray(layers))
                atomic_write_bytes(folder / f"{keys[i]}.npz", buf.getvalue())
    for k in keys:
        if k not in found:
            try:
                z = np.load(folder / f"{k}.npz")
                found[k] = (z["states"], z["p"])
            except (OSError, ValueError, KeyError) as e:
                raise JudgeError(f"damaged judge-state cache file {folder / (k + '.npz')} ({e}); delete it") from e
    if not keys:
        return np.zeros((0, len(layers), 0), np.float32), np.zeros((0, 2))
    return np.stack([found[k][0] for k in keys]), np.stack([found[k][1] for k in keys])


def select_probe(states: np.ndarray, labels: Sequence[bool], strata: Sequence[Any], layers: Sequence[int] = PROBE_LAYERS,
                 Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0), folds: int = 5, seed: int = 0) -> dict:
    """Choose the layer and C of the readout by stratified ``folds``-fold cross-validated accuracy on training
    labels only (``strata``: e.g. label × source); returns ``{"layer", "C", "cv": [{layer, C, accuracy}]}``, the
    first best in (layer, C) order."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray([bool(v) for v in labels])
    strata = [f"{a}|{b}" for a, b in zip(y, strata)]
    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(states, strata))
    rows = []
    for li, layer in enumerate(layers):
        for C in Cs:
            hits = np.zeros(len(y), bool)
            for tr, te in splits:
                r = LinearReadout.fit(states[tr, li], y[tr], C=C, seed=seed)
                hits[te] = (r.probability(states[te, li]) > 0.5) == y[te]
            rows.append({"layer": int(layer), "C": float(C), "accuracy": float(hits.mean())})
    best = max(rows, key=lambda r: r["accuracy"])  # max keeps the first of equals
    return {"layer": best["layer"], "C": best["C"], "cv": rows}


class ProbeJudge:
    """A linear readout of the judge model's hidden state (see the module docstring).

    Args:
        backend: a :class:`~crvlm_core.judges.llm.LocalLMBackend` on the model the readout was fitted on.
        readout: the :class:`LinearReadout` of layer ``layer``.
        layer: the ``hidden_states`` index read.
        template, answers, max_response_chars: the judge prompt, as when fitted.
        threshold: refused when the confidence 2p − 1 is above it (0: p > 0.5).
        info: training record (labels, cross-validation table, model).
    """

    name = "llm-probe"

    def __init__(self, backend: Any, readout: LinearReadout, layer: int, template: str = VERDICT_TEMPLATE,
                 answers: Sequence[str] = VERDICTS, max_response_chars: int = 1500, threshold: float = 0.0,
                 info: dict | None = None, cache_dir: Any = None):
        d = backend.handle.hf_model.config.get_text_config().hidden_size
        if readout.dim != d:
            raise JudgeError(f"the llm-probe readout reads {readout.dim}-wide states but {backend.handle.spec} "
                             f"has {d}: it was fitted on another model")
        self.backend, self.readout, self.layer, self.template = backend, readout, int(layer), template
        self.answers, self.max_response_chars, self.threshold = tuple(answers), max_response_chars, threshold
        self.info, self.cache_dir = info or {}, cache_dir

    def confidences(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        states, _ = judge_states(self.backend, prompts, responses, [self.layer], self.template, self.answers,
                                 self.max_response_chars, cache_dir=self.cache_dir)
        if not len(states):
            return []
        return [float(c) for c in 2.0 * self.readout.probability(states[:, 0]) - 1.0]

    def judge(self, prompts: Sequence[str] | None, responses: Sequence[str]) -> list[JudgeResult]:
        prompts, responses = check_pairs(prompts, responses, True, self.name)
        return [JudgeResult(c > self.threshold, c) for c in self.confidences(prompts, responses)]

    # -- artifact ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PROBE_FORMAT, "model": self.backend.handle.spec, "layer": self.layer,
                "template": self.template, "answers": list(self.answers), "max_response_chars": self.max_response_chars,
                "threshold": self.threshold, "readout": self.readout.to_dict(), "info": self.info}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, backend_for: Any, path: str | Path = PROBE_PATH, cache_dir: Any = None) -> ProbeJudge:
        """The judge saved at ``path``; ``backend_for(model_spec)`` builds the backend of the model it names.
        A missing, unreadable or foreign file is a :class:`JudgeError` naming it."""
        try:
            d = json.loads(Path(path).read_text())
            if d.get("format") != PROBE_FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {PROBE_FORMAT}")
            readout = LinearReadout.from_dict(d["readout"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JudgeError(f"{path}: not a usable llm-probe readout ({e})") from e
        return cls(backend_for(d["model"]), readout, d["layer"], d["template"], d["answers"], d["max_response_chars"],
                   d.get("threshold", 0.0), d.get("info"), cache_dir)
