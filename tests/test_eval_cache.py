"""Reuse of unchanged evaluations (the workbook's second run), the intervention fingerprint that keys it, and the
"gate off" ablation of the calibrated intervention."""

import pytest
import torch

from crvlm_core.calibrated_steering import CalibratedSteering
from crvlm_core.calibrator import Calibrator, CalibratorConfig
from crvlm_core.data import assign_scope, load_dataset, split
from crvlm_core.refusal_vectors import evaluate
from crvlm_core.steer import AddVector, ProjectOut, intervention_fingerprint


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
