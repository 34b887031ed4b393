"""Pure plotting functions (seaborn/matplotlib): each takes plain data and returns a Figure; notebooks and widgets
only call them. ``save_figure`` writes PNG + SVG atomically next to each other."""

from __future__ import annotations

import os
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"), force=False)
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

__all__ = ["save_figure", "plot_vector_norms", "plot_method_cosines", "plot_sweep_heatmap", "plot_method_metrics",
           "plot_refusal_scores", "plot_calibration_pca", "plot_score_distributions", "plot_mb_with_ci",
           "plot_ablation", "plot_layer_explorer", "plot_refusal_steering_layers", "plot_dataset_counts",
           "plot_image_examples", "plot_training_losses", "plot_gate_strip", "plot_gate_histogram",
           "plot_vision_ablation", "plot_gate_box"]

SCOPE_NAMES = {"in": "in-scope", "out": "out-of-scope"}


def save_figure(fig, path_stem: str | Path, formats: Sequence[str] = ("png", "svg"), dpi: int = 130) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` and ``<stem>.svg`` (or the given ``formats``; temp file + rename); returns the
    paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in formats:
        final = stem.with_suffix(f".{ext}")
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        fig.savefig(tmp, format=ext, dpi=dpi, bbox_inches="tight")
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
    """Layer × strength heatmap of one column of :func:`crvlm_core.evaluation.sweep` rows."""
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


def _pca_frame(original: torch.Tensor, calibrated: torch.Tensor | None, scopes: Sequence[str]) -> tuple[pd.DataFrame, list]:
    """Two principal components fitted on the original (and calibrated) states; rows labelled by scope and state."""
    from sklearn.decomposition import PCA

    parts = [original.float()] + ([calibrated.float()] if calibrated is not None else [])
    stacked = torch.cat(parts).numpy()
    pca = PCA(n_components=2, random_state=0).fit(stacked)
    xy = pca.transform(stacked)
    kinds = ["original"] * len(original) + (["calibrated"] * len(calibrated) if calibrated is not None else [])
    scope_names = [SCOPE_NAMES.get(s, s) for s in scopes] * len(parts)
    frame = pd.DataFrame({"PC1": xy[:, 0], "PC2": xy[:, 1], "scope": scope_names, "state": kinds})
    return frame, list(pca.explained_variance_ratio_)


def plot_calibration_pca(original: torch.Tensor, calibrated: torch.Tensor | None, scopes: Sequence[str], title: str,
                         ax=None):
    """CR-VLM Figure 4: the first two principal components of last-token states, original (circles) vs calibrated
    (crosses), coloured by scope. ``original``/``calibrated`` are ``[n, d]``; ``calibrated`` may be None."""
    frame, var = _pca_frame(original, calibrated, scopes)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4.4))
    sns.scatterplot(frame, x="PC1", y="PC2", hue="scope", style="state", markers={"original": "o", "calibrated": "X"},
                    hue_order=["in-scope", "out-of-scope"], alpha=0.75, ax=ax)
    ax.set(title=title, xlabel=f"PC1 ({var[0]:.0%} of variance)", ylabel=f"PC2 ({var[1]:.0%} of variance)")
    ax.legend(fontsize=7)
    return fig or ax.figure


def plot_score_distributions(rows: pd.DataFrame, title: str = "Refusal score at the first decoding step"):
    """CR-VLM Figures 13–14: refusal-score histograms of in- vs out-of-scope prompts, one panel per method.
    ``rows`` has columns ``method, scope ('in'/'out'), score``."""
    df = rows.assign(scope=rows["scope"].map(lambda s: SCOPE_NAMES.get(s, s)))
    g = sns.displot(df, x="score", hue="scope", col="method", col_wrap=min(3, df["method"].nunique()), bins=20,
                    element="step", height=2.8, aspect=1.25, hue_order=["in-scope", "out-of-scope"],
                    facet_kws={"sharey": False})
    for ax in g.axes.flat:
        ax.axvline(0, color="grey", lw=0.8)
    g.set_axis_labels("refusal log-odds", "prompts")
    g.set_titles("{col_name}")
    g.figure.suptitle(title, y=1.03)
    return g.figure


def plot_mb_with_ci(table: pd.DataFrame, title: str = "MB-score per method (95 % bootstrap CI)"):
    """CR-VLM Figure 3: MB-score bars per method with confidence intervals. ``table`` has columns ``method, mb_score,
    mb_lo, mb_hi`` and, optionally, ``refusal_rate_out`` / ``over_refusal_in`` (then shown under each method's name).
    Each bar's value sits above its interval."""
    t = table.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(1.6 + 1.0 * len(t), 4.0))
    sns.barplot(t, x="method", y="mb_score", color=sns.color_palette()[0], ax=ax)
    lo = (t["mb_score"] - t["mb_lo"]).clip(lower=0)
    hi = (t["mb_hi"] - t["mb_score"]).clip(lower=0)
    ax.errorbar(range(len(t)), t["mb_score"], yerr=[lo, hi], fmt="none", ecolor="black", capsize=4, lw=1)
    for i, (v, top) in enumerate(zip(t["mb_score"], t[["mb_score", "mb_hi"]].max(axis=1))):
        ax.text(i, top + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    if {"refusal_rate_out", "over_refusal_in"} <= set(t.columns):
        ax.set_xticks(range(len(t)), [f"{m}\nR {r:.2f} · ORR {o:.2f}" for m, r, o in
                                      zip(t["method"], t["refusal_rate_out"], t["over_refusal_in"])])
    ax.set(title=title, xlabel="", ylabel="MB-score = 2R(1−ORR)/(R+1−ORR)", ylim=(0, 1.12))
    ax.tick_params(axis="x", rotation=25, labelsize=8)
    fig.tight_layout()
    return fig


def plot_ablation(table: pd.DataFrame, title: str = "CR-VLM ablations (held-out MMLU)"):
    """R / ORR / MB per ablation variant: ``table`` has columns ``variant, refusal_rate_out, over_refusal_in,
    mb_score``."""
    return plot_method_metrics(table.rename(columns={"variant": "method"}), title)


def plot_layer_explorer(original: torch.Tensor, calibrated: torch.Tensor | None, scopes: Sequence[str],
                        scores_in: Sequence[float], scores_out: Sequence[float], layer: int, alpha: float):
    """The layer explorer's view: PCA of the layer's last-token states (calibrated too, where that layer is steered)
    beside the refusal-score histograms with the vector added at that layer and strength."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    plot_calibration_pca(original, calibrated, scopes, f"Last-token states at layer {layer}", ax=a)
    df = pd.DataFrame({"refusal score": list(scores_in) + list(scores_out),
                       "scope": ["in-scope"] * len(scores_in) + ["out-of-scope"] * len(scores_out)})
    sns.histplot(df, x="refusal score", hue="scope", bins=20, element="step", ax=b,
                 hue_order=["in-scope", "out-of-scope"])
    b.axvline(0, color="grey", lw=0.8)
    b.set(title=f"Refusal score, vector at layer {layer}, α = {alpha:g}", xlabel="refusal log-odds", ylabel="prompts")
    fig.tight_layout()
    return fig


def plot_refusal_steering_layers(results: Mapping[str, Mapping], methods: Sequence[str]):
    """Refusal Steering's layer profile, one row per model of ``results`` that has a ``profile``: held-out AUC and d′
    per layer of each method's direction (its steered layers shaded), and how many principal directions carry 90 %
    of μ_refuse − μ_comply. ``results[spec]`` holds ``profile`` (per-layer lists) and ``<method>["layers"]``."""
    profiled = [(spec, res) for spec, res in results.items() if "profile" in res]
    fig, axes = plt.subplots(len(profiled) or 1, 3, figsize=(15, 3.6 * max(1, len(profiled))), squeeze=False)
    for row, (spec, res) in zip(axes, profiled):
        prof = res["profile"]
        for m, style in zip(methods, ["-", "-", "--"]):  # wrmd dashed: it often lies on rmd
            row[0].plot(prof["layer"], prof[f"{m}_auc"], style, marker=".", label=m)
            row[1].plot(prof["layer"], prof[f"{m}_dprime"], style, marker=".", label=m)
        row[2].bar(prof["layer"], prof["pcs_for_90pct"], color="grey")
        for m in methods:
            for layer in res[m]["layers"]:
                row[1].axvline(layer, color="k", alpha=0.15)
        row[0].set(title=f"{spec}: held-out AUC", xlabel="layer", ylim=(0.4, 1.02))
        row[1].set(title="held-out d′ (steered layers shaded)", xlabel="layer")
        row[2].set(title="principal directions for 90 % of μ_r − μ_c", xlabel="layer")
        row[0].legend()
    fig.tight_layout()
    return fig


def plot_cast_grid(grid: Sequence[Mapping], condition_layer: int,
                   title: str = "CAST condition: layer grid search on the training split"):
    """CAST's condition search per candidate layer (the rows of ``grid_search_condition``'s ``table``): the
    out-of-fold training MB of the condition and how often it fires in scope; the chosen layer dashed."""
    grid = pd.DataFrame(list(grid))
    fig, ax = plt.subplots(figsize=(7, 2.8))
    sns.lineplot(grid, x="layer", y="mb", marker="o", ax=ax, label="train MB of the condition (out of fold)")
    sns.lineplot(grid, x="layer", y="fires_in", marker=".", ax=ax, label="fires on in-scope")
    ax.axvline(condition_layer, color="grey", ls="--")
    ax.set(title=title, ylabel="rate", ylim=(-0.05, 1.05))
    return fig


def plot_policy_mb(table: pd.DataFrame, title: str, columns: Sequence[str] = ("single MB", "composed MB", "union MB"),
                   goal: float = 0.9):
    """MB per constraint (and jointly) of a policy: one bar per design in ``columns`` of ``table`` (index: the
    constraints), the goal dashed."""
    plot = table[list(columns)].rename(columns=lambda s: s.replace(" MB", ""))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    plot.plot.bar(ax=ax, rot=0, width=0.8, color=["#999999", "#1f77b4", "#ff7f0e"][:len(columns)])
    ax.axhline(goal, ls="--", lw=1, color="k", alpha=0.5)
    ax.set(ylim=(0, 1.05), ylabel="MB score", xlabel="", title=title)
    ax.legend(loc="lower left", fontsize=8)
    return fig


__all__ += ["plot_cast_grid", "plot_policy_mb"]


@contextmanager
def _setup_theme():
    """Notebook 00's look (seaborn whitegrid, notebook context, deep palette) for the figures drawn inside only."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"), sns.color_palette("deep"):
        yield


def plot_dataset_counts(counts: pd.DataFrame):
    """Prompts per subject of each bundled dataset, one bar per dataset / subject on a log scale. ``counts`` has
    columns ``dataset, subject, n``."""
    with _setup_theme():
        plot_df = counts.assign(label=counts["dataset"] + " / " + counts["subject"])
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(plot_df) + 1))
        sns.barplot(data=plot_df, y="label", x="n", hue="dataset", dodge=False, legend=False, ax=ax)  # labels name it
        ax.set_xscale("log")
        ax.set_xlabel("prompts (log scale)")
        ax.set_ylabel("")
        fig.tight_layout()
    return fig


def plot_image_examples(images: Sequence, titles: Sequence[str], captions: Sequence[str], wrap: int = 34):
    """One row of images (PIL images or arrays), each titled (e.g. its subject) with its caption (e.g. the question)
    wrapped underneath."""
    with _setup_theme():
        fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 4.2), squeeze=False)
        for ax, image, title, caption in zip(axes[0], images, titles, captions):
            ax.imshow(image)
            ax.set_title(title, fontsize=11, fontweight="bold")
            ax.set_xlabel("\n".join(textwrap.wrap(caption, wrap)), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
    return fig


def plot_training_losses(log: pd.DataFrame, terms: Sequence[str] = ("loss_out", "loss_in", "loss_ortho", "total"),
                         title: str = "Calibrator training losses per epoch"):
    """One log-scale panel per loss term (those of ``terms`` that ``log`` has) over epochs, a line per variant.
    ``log`` has columns ``variant, epoch`` and the terms."""
    terms = [c for c in terms if c in log.columns]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3), squeeze=False)
    for ax, term in zip(axes[0], terms):
        sns.lineplot(log, x="epoch", y=term, hue="variant", ax=ax, legend=term == terms[-1])
        ax.set(title=term.replace("loss_", "L_") if term != "total" else "total loss", yscale="log")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_gate_strip(gates: pd.DataFrame, title: str = "Gate value ρ on held-out questions"):
    """Gate value ρ of every question, one strip per variant and scope. ``gates`` has columns ``variant, scope,
    rho``."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    sns.stripplot(gates, x="variant", y="rho", hue="scope", dodge=True, alpha=0.6, ax=ax)
    ax.set(title=title, xlabel="", ylabel="ρ (mean over steered layers)", ylim=(-0.05, 1.05))
    return fig


def plot_gate_histogram(gates: pd.DataFrame, variant: str):
    """Histogram of one variant's gate values ρ by scope. ``gates`` has columns ``variant, scope, rho``."""
    fig, ax = plt.subplots(figsize=(6, 3))
    sns.histplot(gates[gates["variant"] == variant], x="rho", hue="scope", bins=20, ax=ax)
    ax.set(title=f"ρ on held-out questions — {variant}")
    return fig


def plot_gate_box(gates: pd.DataFrame, title: str = "Gate value ρ on held-out questions"):
    """Box plot of the gate values ρ per variant and scope. ``gates`` has columns ``variant, scope, rho``."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    sns.boxplot(gates, x="variant", y="rho", hue="scope", ax=ax)
    ax.set(title=title, xlabel="", ylabel="ρ (mean over steered layers)")
    ax.tick_params(axis="x", rotation=20)
    return fig


def plot_vision_ablation(table: pd.DataFrame, model: str):
    """The vision-loss ablation (CR-VLM Figure 6 / Table 5): per variant, the cosine of predicted vs vision-only
    shifts and the image-only refusal scores out and in scope. ``table`` has columns ``variant, shift_cosine_mean,
    image_only_score_out, image_only_score_in``."""
    long = table.melt(id_vars="variant", value_vars=["shift_cosine_mean", "image_only_score_out", "image_only_score_in"],
                      var_name="measure", value_name="value")
    long["measure"] = long["measure"].map({"shift_cosine_mean": "cosine: predicted vs\nvision-only shift",
                                           "image_only_score_out": "image-only refusal score\n(out-of-scope images)",
                                           "image_only_score_in": "image-only refusal score\n(in-scope images)"})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    sns.barplot(long, x="measure", y="value", hue="variant", ax=ax)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title=f"Vision loss ablation on {model}", xlabel="", ylabel="cosine / refusal log-odds")
    return fig
