"""Reuse of unchanged evaluations (the workbook's second run), the intervention fingerprint that keys it, and the
"gate off" ablation of the calibrated intervention."""

import pytest
import torch

from crvlm_core.methods.crvlm.calibrated import CalibratedSteering
from crvlm_core.methods.crvlm.config import CalibratorConfig, CrvlmConfig
from crvlm_core.methods.crvlm.module import Calibrator
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.evaluation import evaluate
from crvlm_core.methods.refusal_vectors import VectorConfig
from crvlm_core.steer.interventions import AddVector, ProjectOut, intervention_fingerprint


def _vec(n_layers, d, seed=0):
    return torch.randn(n_layers, d, generator=torch.Generator().manual_seed(seed))


def test_fingerprint_tracks_what_the_intervention_does():
    v = _vec(4, 8)
    base = intervention_fingerprint([AddVector(v, (1,), 1.0)])
    assert base == intervention_fingerprint([AddVector(v.clone(), (1,), 1.0)])
    assert base != intervention_fingerprint([AddVector(v, (1,), 2.0)])
    assert base != intervention_fingerprint([AddVector(v, (2,), 1.0)])
    assert base != intervention_fingerprint([AddVector(_vec(4, 8, seed=1), (1,), 1.0)])
    assert base != intervention_fingerprint([ProjectOut(v, (1,), 1.0)])
    assert intervention_fingerprint([]) == "unsteered"
    cal = Calibrator(CalibratorConfig(hidden_size=8, layers=[1], width=4))
    a = intervention_fingerprint([CalibratedSteering(cal, (1,))])
    with torch.no_grad():
        next(cal.parameters()).add_(1.0)
    assert a != intervention_fingerprint([CalibratedSteering(cal, (1,))])
    assert a != intervention_fingerprint([CalibratedSteering(cal, (1,), fixed_gate=1.0)])
    with pytest.raises(ValueError, match="fixed_gate"):
        CalibratedSteering(cal, (1,), fixed_gate=1.5)


@pytest.mark.parametrize("bad, match", [
    (dict(method="nope"), "unknown method"), (dict(layers=[]), "layers must be a non-empty list"), (dict(ridge_lambda=-1.0), "ridge_lambda"),
    (dict(alpha=float("inf")), "alpha"), (dict(batch_size=0), "batch_size"),
])
def test_vector_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        VectorConfig(**bad)
    assert VectorConfig("pca", layers=[3, 1]).layers == (3, 1)


def test_evaluate_reuses_an_unchanged_result(smollm2, tmp_path):
    _, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=1, n_test=1, seed=3)
    v = _vec(smollm2.n_layers, smollm2.hidden_size)
    kw = dict(max_new_tokens=3, progress=False, cache_dir=tmp_path)
    first = evaluate(smollm2, test, [AddVector(v, (5,), 1.0)], **kw)
    assert len(list(tmp_path.glob("eval-*.json"))) == 1
    again = evaluate(smollm2, test, [AddVector(v, (5,), 1.0)], **kw)
    assert again.metrics == first.metrics and again.rows == first.rows
    other = evaluate(smollm2, test, [AddVector(v, (5,), 4.0)], **kw)  # another strength: computed, not reused
    assert len(list(tmp_path.glob("eval-*.json"))) == 2
    assert other.metrics["generation_seconds"] != first.metrics["generation_seconds"]
    # a damaged entry is recomputed, not trusted
    for entry in tmp_path.glob("eval-*.json"):
        entry.write_text("{not json")
    redone = evaluate(smollm2, test, [AddVector(v, (5,), 1.0)], **kw)
    assert redone.rows == first.rows and redone.metrics["generation_seconds"] != first.metrics["generation_seconds"]


def test_gate_off_holds_rho_for_every_row(smollm2):
    cal = Calibrator(CalibratorConfig(hidden_size=smollm2.hidden_size, layers=[3], width=8))
    steering = CalibratedSteering(cal, (3,), fixed_gate=1.0)
    enc = smollm2.build_inputs(["a", "a longer prompt"])
    steering.prepare(smollm2, enc)
    x = torch.randn(2, 5, smollm2.hidden_size)
    _, rho, _ = cal(x[:, -1], 3)
    assert torch.equal(rho.squeeze(-1), torch.ones(2))
    steering.release()
    _, rho_own, _ = cal(x[:, -1], 3)
    assert not torch.equal(rho_own.squeeze(-1), torch.ones(2))


def test_sweep_generates_through_the_cached_evaluation(smollm2, tmp_path):
    from crvlm_core.evaluation import refusal_score_grid, score_sweep, sweep
    from crvlm_core.vectors.steering_vector import SteeringVector

    _, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=1, n_test=1, seed=4)
    vec = SteeringVector(directions=_vec(smollm2.n_layers, smollm2.hidden_size), method="test", layers=[5])
    rows = sweep(smollm2, vec, test, [5], [0.5, 1.0], max_new_tokens=2, cache_dir=tmp_path)
    assert [(r["layer"], r["alpha"]) for r in rows] == [(5, 0.5), (5, 1.0)]
    assert all(0 <= r["refusal_rate_out"] <= 1 and isinstance(r["example_in"], str) for r in rows)
    assert len(list(tmp_path.glob("eval-*.json"))) == 2
    assert sweep(smollm2, vec, test, [5], [0.5, 1.0], max_new_tokens=2, cache_dir=tmp_path) == rows
    grid = refusal_score_grid(smollm2, vec, test, [3, 5], [0.0, 1.0], cache_dir=tmp_path, progress=False)
    assert len(grid) == 2 * 2 * len(test)
    unsteered = [r["score"] for r in grid if r["alpha"] == 0.0]
    assert unsteered[: len(test)] == unsteered[len(test):]  # α = 0 is the same unsteered forward for every layer
    steered = {r["layer"]: r["score"] for r in grid if r["alpha"] == 1.0 and r["id"] == test[0].id}
    assert steered[3] != steered[5]
    assert refusal_score_grid(smollm2, vec, test, [3, 5], [0.0, 1.0], cache_dir=tmp_path, progress=False) == grid
    # a score-only sweep reads the same cached grid: its means are the grid's, and it adds no cache file
    files = set(tmp_path.iterdir())
    scored = score_sweep(smollm2, vec, test, [3, 5], [0.0, 1.0], cache_dir=tmp_path)
    assert set(tmp_path.iterdir()) == files
    out = [r["score"] for r in grid if r["layer"] == 5 and r["alpha"] == 1.0 and r["scope"] == "out"]
    assert scored[3]["refusal_score_out"] == pytest.approx(sum(out) / len(out))


def test_calibrated_states_match_the_calibrator_on_extracted_states(smollm2):
    from crvlm_core.methods.crvlm.steering import fit_crvlm
    from crvlm_core.extract import extract

    train, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=3, n_test=2, seed=42)
    steering = fit_crvlm(smollm2, train, CrvlmConfig(layers=[10], gate_layer=20, width=16, epochs=1), progress=False)
    original, calibrated, rho = steering.calibrated_states(smollm2, test, cache_dir=False)
    assert original.shape == calibrated.shape == (len(test), 1, smollm2.hidden_size) and rho.shape == (len(test), 1)
    acts = extract(smollm2, test, layers=[10, 20], cache_dir=False, progress=False)
    torch.testing.assert_close(original[:, 0], acts.at(10).float())
    expected, expected_rho, _ = steering.calibrator(acts.at(10).float(), 10, acts.at(20).float())
    torch.testing.assert_close(calibrated[:, 0], expected)
    torch.testing.assert_close(rho[:, 0], expected_rho)
    torch.testing.assert_close(steering.gate(smollm2, test), rho.mean(1))
    from dataclasses import replace

    _, off, off_rho = replace(steering, fixed_gate=1.0).calibrated_states(smollm2, test, cache_dir=False)
    assert torch.equal(off_rho, torch.ones_like(off_rho)) and not torch.allclose(off, calibrated)
