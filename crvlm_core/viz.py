"""Pure plotting functions (seaborn/matplotlib): each takes plain data and returns a Figure; notebooks and widgets
only call them. ``save_figure`` writes PNG + SVG atomically next to each other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"), force=False)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

__all__ = ["save_figure", "plot_vector_norms", "plot_method_cosines", "plot_sweep_heatmap", "plot_method_metrics",
           "plot_refusal_scores"]


def save_figure(fig, path_stem: str | Path) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (temp file + rename); returns the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "svg"):
        final = stem.with_suffix(f".{ext}")
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight")
        os.replace(tmp, final)
        written.append(final)
    return written


def plot_vector_norms(directions: Mapping[str, torch.Tensor], residual_norms: Sequence[float] | None = None):
    """Per-layer norm of each method's vector (and, optionally, of the residual stream for scale)."""
    rows = [{"layer": l, "norm": float(n), "vector": name} for name, d in directions.items()
            for l, n in enumerate(d.norm(dim=-1))]
    if residual_norms is not None:
        rows += [{"layer": l, "norm": float(n), "vector": "residual stream (mean ‖h‖)"} for l, n in enumerate(residual_norms)]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(pd.DataFrame(rows), x="layer", y="norm", hue="vector", marker="o", ax=ax)
    ax.set(title="Refusal-vector norm per layer", xlabel="decoder layer", ylabel="L2 norm", yscale="log")
    ax.legend(fontsize=7)
    return fig


def plot_method_cosines(directions: Mapping[str, torch.Tensor], reference: str):
    """Cosine similarity per layer between each method's vector and the ``reference`` method's."""
    ref = directions[reference]
    rows = [{"layer": l, "cosine": float(c), "vector": name} for name, d in directions.items() if name != reference
            for l, c in enumerate(torch.nn.functional.cosine_similarity(d, ref, dim=-1))]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.lineplot(pd.DataFrame(rows), x="layer", y="cosine", hue="vector", marker="o", ax=ax)
    ax.set(title=f"Cosine similarity to the {reference} vector", xlabel="decoder layer", ylabel="cosine", ylim=(-1, 1))
    ax.axhline(0, color="grey", lw=0.8)
    ax.legend(fontsize=7)
    return fig


def plot_sweep_heatmap(rows: Sequence[Mapping], value: str, title: str, fmt: str = ".2f", cmap: str = "viridis"):
    """Layer × strength heatmap of one column of :func:`crvlm_core.refusal_vectors.sweep` rows."""
    table = pd.DataFrame(rows).pivot_table(index="alpha", columns="layer", values=value)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * table.shape[1], 1.2 + 0.5 * table.shape[0]))
    sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, ax=ax, cbar_kws={"label": value})
    ax.set(title=title, xlabel="steered layer", ylabel="strength α")
    return fig


def plot_method_metrics(table: pd.DataFrame, title: str = "Refusal vectors at their best layer and strength"):
    """Grouped bars of R, ORR and MB per method (``table`` has columns method, refusal_rate_out, over_refusal_in,
    mb_score)."""
    long = table.melt(id_vars="method", value_vars=["refusal_rate_out", "over_refusal_in", "mb_score"],
                      var_name="metric", value_name="value")
    long["metric"] = long["metric"].map({"refusal_rate_out": "R (refusal, out-of-scope)",
                                         "over_refusal_in": "ORR (over-refusal, in-scope)", "mb_score": "MB-score"})
    fig, ax = plt.subplots(figsize=(8, 3.8))
    sns.barplot(long, x="method", y="value", hue="metric", ax=ax)
    ax.set(title=title, xlabel="", ylabel="rate", ylim=(0, 1.05))
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def plot_refusal_scores(scores_in: Sequence[float], scores_out: Sequence[float], title: str):
    """Histograms of first-step refusal scores for in-scope vs out-of-scope prompts."""
    df = pd.DataFrame({"refusal score": list(scores_in) + list(scores_out),
                       "scope": ["in-scope"] * len(scores_in) + ["out-of-scope"] * len(scores_out)})
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.histplot(df, x="refusal score", hue="scope", bins=20, element="step", ax=ax)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set(title=title, xlabel="log-odds of a refusal start at the first decoding step", ylabel="prompts")
    return fig
