"""A linear readout: standardisation + L2 logistic regression (scikit-learn) over feature vectors, its probability
and its JSON form. The learned judge reads MiniLM features with one; the llm-probe judge reads the judge model's
hidden states with one."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["LinearReadout"]


class LinearReadout:
    """``p(refusal | x) = σ(((x − mean) / scale) · coef + intercept)``.

    Args:
        mean, scale: the standardisation (per feature; a zero scale is stored as 1).
        coef, intercept: the logistic regression on the standardised features.
    """

    def __init__(self, mean: Sequence[float], scale: Sequence[float], coef: Sequence[float], intercept: float):
        self.mean, self.scale, self.coef = (np.asarray(a, np.float64) for a in (mean, scale, coef))
        self.intercept = float(intercept)
        if not self.mean.shape == self.scale.shape == self.coef.shape or self.coef.ndim != 1:
            raise ValueError(f"readout: mean, scale and coef must be vectors of one length, got "
                             f"{self.mean.shape}, {self.scale.shape}, {self.coef.shape}")

    @property
    def dim(self) -> int:
        return int(self.coef.shape[0])

    @classmethod
    def fit(cls, x: np.ndarray, labels: Sequence[bool], C: float = 1.0, seed: int = 0,
            class_weight: str | None = None) -> LinearReadout:
        """Standardise ``x`` ``[n, d]`` and fit an L2 logistic regression (``C``: inverse regularisation;
        ``class_weight="balanced"`` weighs both classes the same whatever their counts)."""
        from sklearn.linear_model import LogisticRegression

        x = np.asarray(x, np.float64)
        y = np.asarray([bool(v) for v in labels], dtype=int)
        if len(set(y)) < 2:
            raise ValueError("a readout needs both refusals and answers to train on")
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        clf = LogisticRegression(C=C, max_iter=5000, random_state=seed, class_weight=class_weight)
        clf.fit((x - mean) / scale, y)
        return cls(mean, scale, clf.coef_[0], clf.intercept_[0])

    def probability(self, x: np.ndarray) -> np.ndarray:
        """p(refusal) for each row of ``x`` ``[n, d]``."""
        x = np.asarray(x, np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"readout: expected features [n, {self.dim}], got {list(x.shape)}")
        z = ((x - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    @classmethod
    def from_dict(cls, d: dict) -> LinearReadout:
        return cls(d["mean"], d["scale"], d["coef"], d["intercept"])
