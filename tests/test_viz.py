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


def _gates():
    return pd.DataFrame([{"variant": v, "scope": s, "rho": float(r)} for v in ("a", "b", "c") for s in ("in", "out")
                         for r in torch.rand(5)])


def test_dataset_counts_one_bar_per_subject_without_changing_the_global_style():
    import matplotlib

    before = dict(matplotlib.rcParams)
    counts = pd.DataFrame({"dataset": ["mmlu", "mmlu", "mm"], "subject": ["biology", "law", "art"], "n": [200, 150, 12]})
    fig = viz.plot_dataset_counts(counts)
    (ax,) = fig.axes
    assert len(ax.patches) == 3 and ax.get_xscale() == "log" and ax.get_xlabel() == "prompts (log scale)"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["mmlu / biology", "mmlu / law", "mm / art"]
    assert dict(matplotlib.rcParams) == before  # the whitegrid theme applies to this figure only


def test_image_examples_one_panel_per_image(tmp_path):
    import numpy as np

    images = [np.zeros((8, 8, 3)), np.ones((8, 8, 3))]
    fig = viz.plot_image_examples(images, ["biology", "law"], ["What does this cell do? " * 4, "Is this legal?"])
    assert len(fig.axes) == 2 and all(len(ax.images) == 1 for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == ["biology", "law"]
    assert "\n" in fig.axes[0].get_xlabel()  # the caption is wrapped
    written = viz.save_figure(fig, tmp_path / "examples", formats=("png",), dpi=60)
    assert [p.name for p in written] == ["examples.png"] and not (tmp_path / "examples.svg").exists()


def test_training_losses_one_panel_per_logged_term():
    log = pd.DataFrame([{"variant": v, "epoch": e, "loss_out": 1.0 / (e + 1), "loss_in": 0.5, "total": 2.0 / (e + 1)}
                        for v in ("paper gate", "prefill gate") for e in range(4)])
    fig = viz.plot_training_losses(log)
    _labelled(fig)
    assert [ax.get_title() for ax in fig.axes] == ["L_out", "L_in", "total loss"]  # loss_ortho not logged: no panel
    assert all(len(ax.lines) >= 2 and ax.get_yscale() == "log" for ax in fig.axes)
    assert fig.axes[-1].get_legend() is not None and fig.axes[0].get_legend() is None
    assert len(viz.plot_training_losses(log, terms=("total",)).axes) == 1


def test_gate_figures():
    torch.manual_seed(0)
    gates = _gates()
    strip = viz.plot_gate_strip(gates)
    _labelled(strip)
    (ax,) = strip.axes
    assert len(ax.collections) == 6 and ax.get_ylim() == (-0.05, 1.05)  # a strip per variant and scope
    box = viz.plot_gate_box(gates)
    _labelled(box)
    assert len(box.axes[0].patches) >= 6  # a box per variant and scope
    hist = viz.plot_gate_histogram(gates, "b")
    _labelled(hist)
    assert hist.axes[0].get_title() == "ρ on held-out questions — b"
    assert sum(p.get_height() for p in hist.axes[0].patches) == 10  # only variant b's ten questions


def test_vision_ablation_bars_per_measure_and_variant():
    table = pd.DataFrame({"variant": ["with L_vision", "without L_vision"], "shift_cosine_mean": [0.3, 0.1],
                          "image_only_score_out": [1.0, -0.5], "image_only_score_in": [-1.0, -2.0]})
    fig = viz.plot_vision_ablation(table, "tiny-llava")
    _labelled(fig)
    (ax,) = fig.axes
    assert ax.get_title() == "Vision loss ablation on tiny-llava"
    assert len([p for p in ax.patches if p.get_height() != 0]) == 6  # 3 measures × 2 variants
