"""CAST, conditional activation steering (batched): the refusal vector is added only to the prompts whose last-token
state at a condition layer points along the out- minus in-scope mean difference; the layer and threshold are
grid-searched on the training split with cross-fitting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from crvlm_core.data.schema import Sample
from crvlm_core.extract import extract
from crvlm_core.metrics import mb_score
from crvlm_core.models.handle import ModelHandle
from crvlm_core.steer.base import PrefillGate
from crvlm_core.steer.interventions import AddVector
from crvlm_core.vectors.steering_vector import SteeringVector

__all__ = ["ConditionalSteering", "condition_scores", "fit_cast", "grid_search_condition"]


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
    layer), through :class:`~crvlm_core.steer.base.PrefillGate`, the mechanism the CR-VLM calibrator's prefill gate uses —
    and holds for every generated token of that row. It fires when ``cos(h − center, condition) > threshold``.
    """

    condition: torch.Tensor | None = None
    center: torch.Tensor | None = None
    gate_layer: int | None = None
    threshold: float = 0.0
    gate_pass: str = "separate"  # "shared": one prompt pass, the vector added from the last prompt token on

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

    def steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._fires is None:
            raise RuntimeError("CAST's condition is unset: run it through steered_generate / steered_logits, which "
                               "call prepare() on each batch")
        mask = self._fires.to(hidden.device, hidden.dtype).view(-1, *([1] * (hidden.ndim - 1)))
        return hidden + mask * (self.alpha * self.vectors[layer].to(hidden.device, hidden.dtype))


def fit_cast(handle: ModelHandle, train: Sequence[Sample], vector: SteeringVector,
             condition_layers: Sequence[int] | None = None, batch_size: int = 8, seed: int = 42,
             progress: bool = True, gate_pass: str = "separate") -> tuple[ConditionalSteering, dict]:
    """CAST around a fitted refusal ``vector``: the condition layer and threshold grid-searched on the training
    split's last-prompt-token states (candidates ``condition_layers``, default every layer but the first), the
    condition vector and centre refitted on all of it; ``gate_pass`` as in :class:`~crvlm_core.steer.base.
    PrefillGate`. Returns ``(intervention, grid search result)``."""
    inn = [s for s in train if s.scope == "in"]
    out = [s for s in train if s.scope == "out"]
    cand = sorted({handle.check_layer(int(l)) for l in (condition_layers or range(1, handle.n_layers))})
    kw = dict(layers=cand, batch_size=batch_size)
    a_in = extract(handle, inn, progress=progress and "CAST in-scope", **kw).acts
    a_out = extract(handle, out, progress=progress and "CAST out-of-scope", **kw).acts
    search = grid_search_condition(a_in, a_out, cand, seed=seed)
    j = cand.index(search["layer"])
    center, cond = _condition_from(a_in[:, j], a_out[:, j])
    iv = ConditionalSteering(vector.directions, tuple(vector.layers), vector.alpha, condition=cond, center=center,
                             gate_layer=search["layer"], threshold=search["threshold"], gate_pass=gate_pass)
    return iv, search
