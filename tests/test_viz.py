"""Figures: every plotting function returns a figure a reader understands without the code (title, axis labels,
legend where there are groups), and save_figure writes PNG + SVG atomically."""

import pandas as pd
import torch

from crvlm_core import viz


def _labelled(fig, legend=True):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() or ax.get_ylabel(), "an axis without labels"
    assert any(ax.get_title() for ax in axes) or fig._suptitle is not None, "no title"
    if legend:
        assert any(ax.get_legend() is not None for ax in axes) or fig.legends, "no legend"


def test_every_figure_has_title_labels_and_legend(tmp_path):
    torch.manual_seed(0)
    dirs = {"teacher-forced": torch.randn(6, 8), "prompt-based": torch.randn(6, 8)}
    states, scopes = torch.randn(12, 8), ["in"] * 6 + ["out"] * 6
    table = pd.DataFrame({"method": ["a", "b"], "refusal_rate_out": [0.9, 0.5], "over_refusal_in": [0.1, 0.5],
                          "mb_score": [0.9, 0.5], "mb_lo": [0.8, 0.3], "mb_hi": [0.95, 0.7]})
    scores = pd.DataFrame({"method": ["a"] * 8 + ["b"] * 8, "scope": (["in"] * 4 + ["out"] * 4) * 2,
                           "score": torch.randn(16).tolist()})
    sweep = [{"layer": l, "alpha": a, "mb_score": l * a / 10} for l in (1, 2) for a in (1.0, 2.0)]
    _labelled(viz.plot_vector_norms(dirs, residual_norms=[1.0] * 6))
    _labelled(viz.plot_method_cosines(dirs, "teacher-forced"))
    _labelled(viz.plot_sweep_heatmap(sweep, "mb_score", "MB per layer and strength"), legend=False)
    _labelled(viz.plot_method_metrics(table))
    _labelled(viz.plot_refusal_scores([0.1, -1.0], [2.0, 1.5], "scores"))
    _labelled(viz.plot_calibration_pca(states, states + 1, scopes, "PCA"))
    _labelled(viz.plot_score_distributions(scores))
    _labelled(viz.plot_ablation(table.rename(columns={"method": "variant"})))
    _labelled(viz.plot_layer_explorer(states, None, scopes, [0.1, 0.2], [1.0, 2.0], layer=3, alpha=1.0))
    fig = viz.plot_mb_with_ci(table, "MB")
    _labelled(fig, legend=False)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["a\nR 0.90 · ORR 0.10", "b\nR 0.50 · ORR 0.50"]
    values = {t.get_text(): t.get_position()[1] for t in ax.texts}
    assert values["0.90"] >= 0.95 and values["0.50"] >= 0.7  # above the interval, not inside it
    written = viz.save_figure(fig, tmp_path / "sub" / "mb")
    assert [p.suffix for p in written] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in written)
    assert not list((tmp_path / "sub").glob(".*tmp*"))
