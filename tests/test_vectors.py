"""Tests for crvlm_core.vectors: estimators against closed-form answers on tiny tensors, and the vector artifact."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from crvlm_core.core.artifacts import ArtifactError, ArtifactExists
from crvlm_core.vectors.estimators import mean_diff, pca_direction, prompt_based, teacher_forced_mean_diff
from crvlm_core.vectors.linalg import normalize, rescale_to
from crvlm_core.vectors.ridge import ridge_direction, rmd, wrmd
from crvlm_core.vectors.steering_vector import SteeringVector, load_vector


def _cos(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _np_ridge(x, y, lam, w=None):
    """Closed form w = (Xcᵀ W Xc + λI)⁻¹ Xcᵀ W yc with weighted centring."""
    w = np.ones(len(y)) if w is None else w
    xc = x - (w @ x) / w.sum()
    yc = y - (w @ y) / w.sum()
    return np.linalg.solve(xc.T @ (w[:, None] * xc) + lam * np.eye(x.shape[1]), xc.T @ (w * yc))


def _np_rmd(xp, xn, lam, wp=None, wn=None):
    wp = np.ones(len(xp)) if wp is None else wp
    wn = np.ones(len(xn)) if wn is None else wn
    mp, mn = (wp @ xp) / wp.sum(), (wn @ xn) / wn.sum()
    cp, cn = xp - mp, xn - mn
    sigma = (cp.T @ (wp[:, None] * cp) + cn.T @ (wn[:, None] * cn)) / (wp.sum() + wn.sum())
    return np.linalg.solve(sigma + lam * np.eye(xp.shape[1]), mp - mn)


# ------------------------------------------------------------------------------------ difference in means


def test_mean_diff_hand_made():
    pos = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 4.0], [2.0, 2.0]]])  # [2, 2, 2]
    neg = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])  # [1, 2, 2]
    expected = torch.tensor([[2.0, 2.0], [0.0, 0.0]])
    assert torch.equal(mean_diff(pos, neg), expected)
    assert torch.equal(teacher_forced_mean_diff(pos, neg), expected)
    assert torch.equal(prompt_based(pos, neg), expected)
    assert mean_diff(pos.double(), neg.double()).dtype == torch.float32


def test_normalize_and_rescale_to():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.allclose(normalize(v), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    ref = torch.tensor([[0.0, 10.0], [1.0, 1.0]])
    out = rescale_to(v, ref)
    assert torch.allclose(out, torch.tensor([[6.0, 8.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        rescale_to(v, torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------- ridge


@pytest.mark.parametrize("n,d", [(40, 5), (6, 10)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ridge_matches_numpy_closed_form(n, d, weighted):
    g = np.random.default_rng(0)
    acts = g.normal(size=(n, 3, d))
    y = g.normal(size=n)
    w = g.uniform(0.2, 2.0, size=n) if weighted else None
    lam = 0.7
    weights = None if w is None else torch.tensor(w)
    out = ridge_direction(torch.tensor(acts), torch.tensor(y), lam, weights, rescale=False)
    assert out.shape == (3, d) and out.dtype == torch.float32
    for layer in range(3):
        np.testing.assert_allclose(out[layer].numpy(), _np_ridge(acts[:, layer], y, lam, w), rtol=1e-5, atol=1e-6)


def test_ridge_matches_sklearn_with_sample_weight():
    from sklearn.linear_model import Ridge

    g = np.random.default_rng(1)
    acts = g.normal(size=(30, 1, 4))
    y = (g.uniform(size=30) > 0.5).astype(float)
    w = g.uniform(0.1, 1.0, size=30)
    out = ridge_direction(torch.tensor(acts), torch.tensor(y), 2.0, torch.tensor(w), rescale=False)
    ref = Ridge(alpha=2.0).fit(acts[:, 0], y, sample_weight=w).coef_
    np.testing.assert_allclose(out[0].numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1e-9])
def test_ridge_small_lambda_is_ols(lam):
    g = np.random.default_rng(2)
    acts = g.normal(size=(50, 2, 4))
    y = acts[:, 0] @ np.array([1.0, -2.0, 0.5, 0.0]) + 3.0 + 0.1 * g.normal(size=50)
    out = ridge_direction(torch.tensor(acts), torch.tensor(y), lam, rescale=False)
    for layer in range(2):
        design = np.column_stack([acts[:, layer], np.ones(50)])
        ols = np.linalg.lstsq(design, y, rcond=None)[0][:4]
        np.testing.assert_allclose(out[layer].numpy(), ols, rtol=1e-5, atol=1e-6)


def test_ridge_lambda_zero_underdetermined_is_min_norm():
    g = np.random.default_rng(3)
    acts = g.normal(size=(4, 1, 8))  # n < d: singular system
    y = g.normal(size=4)
    out = ridge_direction(torch.tensor(acts), torch.tensor(y), 0.0, rescale=False)
    xc, yc = acts[:, 0] - acts[:, 0].mean(0), y - y.mean()
    np.testing.assert_allclose(out[0].numpy(), np.linalg.pinv(xc) @ yc, rtol=1e-5, atol=1e-6)


def test_ridge_rescale_binary_labels_matches_mean_diff_norm():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(20, 2, 6, generator=g)
    y = torch.tensor([1.0] * 8 + [0.0] * 12)
    raw = ridge_direction(acts, y, 1.0, rescale=False)
    out = ridge_direction(acts, y, 1.0)
    ref = mean_diff(acts[:8], acts[8:])
    assert torch.allclose(out.norm(dim=-1), ref.norm(dim=-1), rtol=1e-5)
    for layer in range(2):
        assert _cos(out[layer], raw[layer]) > 1 - 1e-6


# ------------------------------------------------------------------------------------------------- rmd


def _anisotropic_classes():
    """Two classes whose pooled (÷N) covariance is exactly diag(100, 1), with μ_pos − μ_neg = (1, 1)."""
    a, b = math.sqrt(200.0), math.sqrt(2.0)
    offsets = torch.tensor([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]], dtype=torch.float64)
    pos = (torch.tensor([0.5, 0.5], dtype=torch.float64) + offsets)[:, None, :]
    neg = (torch.tensor([-0.5, -0.5], dtype=torch.float64) + offsets)[:, None, :]
    return pos, neg


@pytest.mark.parametrize("lam", [0.0, 0.5, 10.0])
def test_rmd_anisotropic_closed_form(lam):
    pos, neg = _anisotropic_classes()
    raw = rmd(pos, neg, lam, rescale=False)[0]
    expected = torch.tensor([1 / (100 + lam), 1 / (1 + lam)])
    assert torch.allclose(raw, expected, rtol=1e-5)
    out = rmd(pos, neg, lam)[0]
    angle = math.atan2(out[1], out[0])
    assert angle == pytest.approx(math.atan2(1 / (1 + lam), 1 / (100 + lam)), abs=1e-5)
    assert float(out.norm()) == pytest.approx(math.sqrt(2), rel=1e-5)  # rescaled to ‖μ_pos − μ_neg‖


@pytest.mark.parametrize("n,d,lam", [(30, 4, 0.3), (5, 12, 0.3), (30, 4, 0.0)])
def test_rmd_matches_numpy_closed_form(n, d, lam):
    g = np.random.default_rng(4)
    xp, xn = g.normal(1.0, 1.0, size=(n, 2, d)), g.normal(0.0, 2.0, size=(n + 3, 2, d))
    wp, wn = g.uniform(0.1, 1.0, size=n), g.uniform(0.1, 1.0, size=n + 3)
    out = rmd(torch.tensor(xp), torch.tensor(xn), lam, torch.tensor(wp), torch.tensor(wn), rescale=False)
    for layer in range(2):
        ref = _np_rmd(xp[:, layer], xn[:, layer], lam, wp, wn)
        np.testing.assert_allclose(out[layer].numpy(), ref, rtol=1e-4, atol=1e-6)


def test_rmd_lambda_to_infinity_is_mean_diff():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(7, 3, 16, generator=g) + 0.5, torch.randn(9, 3, 16, generator=g)
    md = mean_diff(pos, neg)
    lam = 1e8
    out = rmd(pos, neg, lam)
    raw = rmd(pos, neg, lam, rescale=False)
    for layer in range(3):
        assert _cos(out[layer], md[layer]) > 0.9999
    assert torch.allclose(lam * raw.double(), md.double(), rtol=1e-4, atol=1e-5)


def test_rmd_all_equal_weights_equal_unweighted_exactly():
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(6, 2, 5, generator=g), torch.randn(4, 2, 5, generator=g)
    base = rmd(pos, neg, 0.1)
    assert torch.equal(rmd(pos, neg, 0.1, torch.full((6,), 0.3), torch.full((4,), 0.3)), base)
    assert torch.equal(wrmd(pos, neg, torch.full((6,), 0.7), torch.full((4,), -0.7), 0.1), base)
    raw = rmd(pos, neg, 0.1, rescale=False)
    assert torch.equal(raw, rmd(pos, neg, 0.1, torch.ones(6), torch.ones(4), rescale=False))


def test_wrmd_downweights_low_confidence_outlier():
    g = torch.Generator().manual_seed(3)
    truth = torch.tensor([1.0, 0.0, 0.0])
    pos = torch.randn(20, 1, 3, generator=g) * 0.3 + truth
    neg = torch.randn(20, 1, 3, generator=g) * 0.3
    pos[0, 0] = torch.tensor([-10.0, 10.0, 0.0])  # a mislabelled sample the judge was unsure about
    pos_conf = torch.ones(20)
    pos_conf[0] = 1e-3
    neg_conf = -torch.ones(20)
    clean = rmd(pos[1:], neg, 0.1)[0]  # what we would get without the outlier
    plain = rmd(pos, neg, 0.1)[0]
    weighted = wrmd(pos, neg, pos_conf, neg_conf, 0.1)[0]
    assert _cos(weighted, clean) > 0.999
    assert _cos(plain, clean) < 0.9
    assert _cos(weighted, truth) > _cos(plain, truth)


# ------------------------------------------------------------------------------------------------- pca


def test_pca_recovers_planted_direction():
    g = torch.Generator().manual_seed(4)
    d = 8
    planted = torch.zeros(d)
    planted[2], planted[5] = 0.6, -0.8
    scale = 3.0 + torch.randn(64, generator=g)  # varying strength along the planted direction
    neg = torch.randn(64, 2, d, generator=g)
    pos = neg + scale[:, None, None] * planted + 0.05 * torch.randn(64, 2, d, generator=g)
    out = pca_direction(pos, neg)
    md = mean_diff(pos, neg)
    for layer in range(2):
        assert _cos(out[layer], planted) > 0.99  # also checks the sign
        assert float(out[layer].norm()) == pytest.approx(float(md[layer].norm()), rel=1e-5)


def test_pca_needs_pairs():
    with pytest.raises(ValueError, match="paired"):
        pca_direction(torch.zeros(3, 1, 2), torch.zeros(4, 1, 2))
    with pytest.raises(ValueError, match="at least 2"):
        pca_direction(torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))


# ---------------------------------------------------------------------------------------------- errors


def test_input_errors():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="empty"):
        mean_diff(torch.zeros(0, 2, 4), x)
    with pytest.raises(ValueError, match="empty"):
        rmd(x, torch.zeros(0, 2, 4), 1.0)
    with pytest.raises(ValueError, match=r"\(3, 2, 4\).*\(3, 2, 5\)"):
        mean_diff(x, torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match=r"\(3, 2, 4\).*\(3, 3, 4\)"):
        rmd(x, torch.randn(3, 3, 4), 1.0)
    bad = x.clone()
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        mean_diff(bad, x)
    with pytest.raises(ValueError, match="NaN"):
        ridge_direction(bad, torch.tensor([0.0, 1.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="lam"):
        rmd(x, x, -1.0)
    with pytest.raises(ValueError, match="lam"):
        ridge_direction(x, torch.tensor([0.0, 1.0, 1.0]), -0.1)
    with pytest.raises(ValueError, match="targets"):
        ridge_direction(x, torch.tensor([0.0, 1.0]), 1.0)
    with pytest.raises(ValueError, match="constant"):
        ridge_direction(x, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="weights"):
        ridge_direction(x, torch.tensor([0.0, 1.0, 1.0]), 1.0, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="sums to zero"):
        wrmd(x, x, torch.zeros(3), torch.ones(3), 1.0)


# -------------------------------------------------------------------------------------- SteeringVector


def _vector(**kw) -> SteeringVector:
    base = dict(
        directions=torch.arange(12, dtype=torch.float32).reshape(4, 3),
        method="rmd",
        layers=[2, 1],
        alpha=2.5,
        positions="prefix-last",
        model_spec="tiny-llama",
        fingerprint="abc123",
        extra={"lambda": 0.5, "scope": ["biology"]},
    )
    base.update(kw)
    return SteeringVector(**base)


def test_vector_fields_and_validation():
    v = _vector()
    assert v.layers == [1, 2] and v.n_layers == 4 and v.hidden_size == 3
    assert _vector(layers=[np.int64(3), torch.tensor(0)]).layers == [0, 3]
    with pytest.raises(ValueError, match="list of ints"):
        _vector(layers=[1.5])
    with pytest.raises(ValueError, match="list of ints"):
        _vector(layers=[True])
    assert _vector(directions=torch.zeros(4, 3, dtype=torch.float64)).directions.dtype == torch.float32
    with pytest.raises(ValueError, match="out of range"):
        _vector(layers=[4])
    with pytest.raises(ValueError, match="out of range"):
        _vector(layers=[-1])
    with pytest.raises(ValueError, match="non-empty"):
        _vector(layers=[])
    with pytest.raises(ValueError, match="duplicates"):
        _vector(layers=[1, 1])
    with pytest.raises(ValueError, match="operation"):
        _vector(operation="multiply")
    with pytest.raises(ValueError, match="NaN"):
        _vector(directions=torch.tensor([[float("nan"), 0.0]] * 4))
    with pytest.raises(ValueError, match="n_layers, d"):
        _vector(directions=torch.zeros(4))
    with pytest.raises(ValueError, match="JSON"):
        _vector(extra={"x": object()})


def test_vector_copies():
    v = _vector()
    w = v.with_layers([0, 3]).with_alpha(-1.0)
    assert w.layers == [0, 3] and w.alpha == -1.0
    assert v.layers == [1, 2] and v.alpha == 2.5
    w.directions[0, 0] = 99.0
    assert v.directions[0, 0] == 0.0
    with pytest.raises(ValueError, match="out of range"):
        v.with_layers([7])


def test_vector_save_load_round_trip(tmp_path):
    v = _vector(operation="project_out", normalized=True)
    out = v.save(tmp_path / "vec")
    assert sorted(os.listdir(out)) == ["artifact.json", "vector.json", "vector.safetensors"]  # no temp files left
    meta = json.loads((out / "vector.json").read_text())
    assert meta["format_version"] == 1 and meta["hidden_size"] == 3 and meta["n_layers"] == 4
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["kind"] == "vector" and manifest["model"]["hidden_size"] == 3 and manifest["model"]["n_layers"] == 4
    assert manifest["config"]["layers"] == [1, 2] and set(manifest["files"]) == {"vector.json", "vector.safetensors"}
    w = SteeringVector.load(out)
    assert torch.equal(w.directions, v.directions)
    for name in ("method", "layers", "operation", "alpha", "normalized", "positions", "hook_site",
                 "model_spec", "fingerprint", "extra"):
        assert getattr(w, name) == getattr(v, name), name


def test_vector_crash_mid_write_keeps_previous(tmp_path, monkeypatch):
    old = _vector()
    old.save(tmp_path)

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        _vector(directions=torch.ones(4, 3)).save(tmp_path, force=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["artifact.json", "vector.json", "vector.safetensors"]
    assert not [p for p in os.listdir(tmp_path.parent) if p.startswith(f".{tmp_path.name}.")]  # no partial folder
    assert torch.equal(SteeringVector.load(tmp_path).directions, old.directions)


def test_vector_load_detects_mismatched_pair_and_missing_files(tmp_path):
    _vector().save(tmp_path / "a")
    _vector(directions=torch.ones(4, 3)).save(tmp_path / "b")
    os.replace(tmp_path / "b" / "vector.safetensors", tmp_path / "a" / "vector.safetensors")
    with pytest.raises(ValueError, match="changed or damaged"):  # the manifest's hash catches it first
        SteeringVector.load(tmp_path / "a")
    with pytest.raises(ValueError, match="does not match"):  # vector.json's own digest, for nested vectors
        SteeringVector.read_files(tmp_path / "a")
    with pytest.raises(ArtifactError, match="vector.safetensors is missing"):
        SteeringVector.load(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="vector.safetensors"):
        SteeringVector.read_files(tmp_path / "b")
    with pytest.raises(ArtifactError, match="no such folder"):
        SteeringVector.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing"):
        SteeringVector.read_files(tmp_path / "nowhere")


def test_vector_save_refuses_a_used_folder_and_force_replaces_it_whole(tmp_path):
    first = _vector().save(tmp_path / "v")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(ArtifactExists, match="holds an artifact"):
        _vector(directions=torch.ones(4, 3)).save(first)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # untouched
    _vector(directions=torch.ones(4, 3)).save(first, force=True, extra_json={"fit.json": {"n": 1}})
    assert torch.equal(SteeringVector.load(first).directions, torch.ones(4, 3))
    assert json.loads((first / "fit.json").read_text()) == {"n": 1}
    assert "fit.json" in json.loads((first / "artifact.json").read_text())["files"]


def test_vector_files_are_byte_identical_and_nest_in_a_parent(tmp_path):
    v = _vector(extra={"b": 1, "a": [2, 3]})
    a, b = v.save(tmp_path / "a"), v.save(tmp_path / "b")
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}
    from safetensors import safe_open

    with safe_open(a / "vector.safetensors", "pt") as f:
        assert list(f.metadata()) == ["crvlm_vector"]  # one entry: safetensors orders several differently per run
    parent = tmp_path / "parent"
    v.write_files(parent / "vector")  # a parent artifact nests its vector without a manifest of its own
    assert sorted(os.listdir(parent / "vector")) == ["vector.json", "vector.safetensors"]
    back = SteeringVector.read_files(parent / "vector")
    assert torch.equal(back.directions, v.directions) and back.extra == v.extra
    with pytest.raises(ArtifactError, match="no artifact.json"):
        SteeringVector.load(parent / "vector")


def test_load_vector_checks_the_model(tmp_path):
    from types import SimpleNamespace

    out = _vector(model_spec="tiny").save(tmp_path / "v")
    fits = SimpleNamespace(spec="tiny", hidden_size=3, n_layers=4)
    assert torch.equal(load_vector(out, fits).directions, _vector().directions)
    with pytest.raises(ArtifactError, match="hidden size 3"):
        load_vector(out, SimpleNamespace(spec="other", hidden_size=5, n_layers=4))
    (out / "artifact.json").write_text(json.dumps({**json.loads((out / "artifact.json").read_text()), "kind": "crvlm"}))
    with pytest.raises(ArtifactError, match="expected vector"):
        load_vector(out)


def test_check_compatible():
    v = _vector()
    v.check_compatible(n_layers=4, hidden_size=3)
    with pytest.raises(ValueError) as exc:
        v.check_compatible(n_layers=30, hidden_size=576)
    assert str(exc.value) == "vector was fitted on a model with hidden size 3 / 4 layers; this model has 576 / 30"
