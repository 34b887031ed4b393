"""Tests for the CR-VLM calibrator (crvlm_core.methods.crvlm config, losses, module, train): losses against hand-computed values, the network's shape contract and gate,
training on synthetic separable activations, resume, save/load and the steering hook."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from crvlm_core.methods.crvlm.config import BehaviouralConfig, CalibratorConfig, CrvlmConfig
from crvlm_core.methods.crvlm.losses import loss_in, loss_ortho, loss_out, loss_vision, total_loss
from crvlm_core.methods.crvlm.module import CALIBRATOR_JSON, CALIBRATOR_SAFETENSORS, Calibrator
from crvlm_core.methods.crvlm.train import TrainRun, fit_probe_gate, train_calibrator
from crvlm_core.steer.interventions import HiddenStateFn

D = 8
LAYERS = [3, 5]
QUIET = TrainRun(progress=False)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _cfg(**kw) -> CalibratorConfig:
    base = dict(hidden_size=D, layers=LAYERS, width=32, lr=1e-3, batch_size=8, epochs=6, seed=0)
    base.update(kw)
    return CalibratorConfig(**base)


def _toy(n: int = 32, seed: int = 0):
    """In-scope cluster around +m, out-of-scope around −m, a refusal vector per layer orthogonal to m."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(D)
    m[0] = 2.0
    s = torch.zeros(len(LAYERS), D)
    s[0, 1] = 3.0
    s[1, 2], s[1, 3] = 3.0, -1.0
    x_in = m + 0.3 * torch.randn(n, len(LAYERS), D, generator=g)
    x_out = -m + 0.3 * torch.randn(n, len(LAYERS), D, generator=g)
    return x_in, x_out, s


def _same_state(a: Calibrator, b: Calibrator) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------- losses


def test_loss_out_hand_computed():
    h_new = _t([[1.0, 0.0], [0.0, 1.0]])
    target = _t([[1.0, 0.0], [1.0, 0.0]])
    # cos = 1, 0 → mean(1 − cos) = 0.5; MSE = (0 + 0 + 1 + 1) / 4 = 0.5
    assert loss_out(h_new, target).item() == pytest.approx(1.0)
    h_new = _t([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    target = _t([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    # cos = 1, 1, 0 → 1/3; squared diffs 1, 0, 0, 4, 0, 4 → 9/6
    assert loss_out(h_new, target).item() == pytest.approx(1 / 3 + 1.5)


def test_loss_in_hand_computed():
    h_new, h = _t([[1.0, 1.0], [0.0, 2.0]]), _t([[1.0, 0.0], [0.0, 0.0]])
    mse = (0 + 1 + 0 + 4) / 4
    rho_in, rho_out = _t([0.2, 0.4]), _t([0.9])
    g_both = -(math.log(0.8) + math.log(0.6) + math.log(0.9)) / 3
    g_in_only = -(math.log(0.8) + math.log(0.6)) / 2
    assert loss_in(h_new, h, rho_in, rho_out).item() == pytest.approx(mse + 0.3 + g_both, rel=1e-6)
    assert loss_in(h_new, h, rho_in).item() == pytest.approx(mse + 0.3 + g_in_only, rel=1e-6)
    assert loss_in(h_new, h, rho_in, rho_out, gate_supervision=False).item() == pytest.approx(mse + 0.3)


def test_loss_ortho_orthogonal_parallel_and_45_degrees():
    d_out = _t([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0)
    assert loss_ortho(d_out, _t([[0.0, 1.0], [0.0, 3.0]])).item() == pytest.approx(0.0, abs=1e-7)
    assert loss_ortho(d_out, _t([[5.0, 0.0], [1.0, 0.0]])).item() == pytest.approx(1.0)
    assert loss_ortho(d_out, _t([[-1.0, 0.0]])).item() == pytest.approx(1.0)  # anti-parallel too
    assert loss_ortho(d_out, _t([[1.0, 1.0]])).item() == pytest.approx(0.5)
    # [n, L, d]: per-layer values averaged (layer 0 orthogonal, layer 1 parallel)
    a = _t([[[1.0, 0.0], [1.0, 0.0]]])
    b = _t([[[0.0, 1.0], [2.0, 0.0]]])
    assert loss_ortho(a, b).item() == pytest.approx(0.5)


def test_loss_vision_uses_the_summed_shifts():
    pred = _t([[1.0, 0.0], [0.0, 1.0]])  # Σ = (1, 1)
    cf = _t([[2.0, 0.0], [0.0, 0.0]])  # Σ = (2, 0)
    assert loss_vision(pred, cf).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert loss_vision(cf, cf).item() == pytest.approx(0.0, abs=1e-7)
    assert loss_vision(-cf, cf).item() == pytest.approx(2.0)


def test_total_loss_respects_switched_off_terms():
    terms = {"loss_out": _t(1.0), "loss_in": _t(2.0), "loss_ortho": _t(3.0), "loss_vision": _t(4.0)}
    assert total_loss(terms).item() == pytest.approx(10.0)
    assert total_loss(terms, w_out=0.5, w_in=0.0, w_ortho=2.0, w_vision=0.0).item() == pytest.approx(6.5)
    nan_terms = dict(terms, loss_ortho=_t(float("nan")))
    assert total_loss(nan_terms, w_ortho=0.0).item() == pytest.approx(7.0)  # a weight-0 term never leaks in
    no_vision = {k: v for k, v in terms.items() if k != "loss_vision"}
    assert total_loss(no_vision).item() == pytest.approx(6.0)
    assert total_loss(dict(terms, loss_vision=None)).item() == pytest.approx(6.0)


# ---------------------------------------------------------------------------------------------- network


def test_forward_shapes_formula_and_gate_strictly_inside_unit_interval():
    cal = Calibrator(_cfg())
    x = torch.randn(2, 3, D)
    x_new, rho, delta = cal(x, 5)
    assert x_new.shape == delta.shape == (2, 3, D) and rho.shape == (2, 3)
    block = cal.blocks["5"]
    with torch.no_grad():
        block.alpha.fill_(0.7)
        x_new, rho, delta = cal(x, 5)
    assert torch.allclose(x_new, x + 0.7 * rho.unsqueeze(-1) * delta, atol=1e-6)
    assert torch.allclose(delta, block.flow(x))
    for scale in (1.0, 1e4, -1e4):  # float32 sigmoid saturates; the gate must not
        rho = cal(scale * torch.randn(5, D), 3)[1]
        assert ((rho > 0) & (rho < 1)).all()
    assert set(cal.blocks) == {"3", "5"}
    with pytest.raises(ValueError, match="not steered"):
        cal(x, 4)
    with pytest.raises(ValueError, match="hidden size 8"):
        cal(torch.randn(2, D + 1), 3)


def test_same_seed_same_init_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = Calibrator(_cfg()), Calibrator(_cfg())
    assert torch.equal(torch.rand(1), before)
    assert _same_state(a, b)
    assert not _same_state(a, Calibrator(_cfg(seed=1)))


def test_prefill_gate_input_and_override():
    cal = Calibrator(_cfg(gate_dim=4))
    x, g = torch.randn(2, 3, D), torch.randn(2, 4)
    x_new, rho, delta = cal(x, 3, gate_input=g)
    expected = torch.sigmoid(cal.blocks["3"].gate(g)).squeeze(-1)
    assert torch.allclose(rho, expected[:, None].expand(2, 3), atol=1e-5)  # one gate value per row
    with pytest.raises(ValueError, match="prefill summary"):
        cal(x, 3)
    rows = cal.gate_values(g)
    assert set(rows) == set(LAYERS) and rows[3].shape == (2,)
    with cal.gate_override(rows):
        assert torch.allclose(cal.apply_hidden(3, x), x_new, atol=1e-6)
        one_token = cal.apply_hidden(3, x[:, :1])  # generation step: same row gates, any seq length
        assert torch.allclose(one_token, x_new[:, :1], atol=1e-6)
    assert cal._gate_override is None
    cal.set_gate_override(torch.tensor([0.0, 1.0]))
    out = cal.apply_hidden(5, x)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])
    cal.clear_gate_override()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cal.set_gate_override(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="rows"):
        with cal.gate_override(torch.tensor([0.5, 0.5, 0.5])):
            cal.apply_hidden(3, x)


def test_to_dtype_and_apply_hidden_keeps_the_callers_dtype():
    cal = Calibrator(_cfg())
    x = torch.randn(2, 3, D, dtype=torch.float64)
    out = cal.apply_hidden(3, x)
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), cal(x.float(), 3)[0], atol=1e-5)
    cal64 = Calibrator(_cfg()).to("cpu", torch.float64)
    assert cal64(x, 3)[0].dtype == torch.float64


def test_as_intervention_changes_only_its_layers():
    cal = Calibrator(_cfg())
    iv = cal.as_intervention()
    assert isinstance(iv, HiddenStateFn) and iv.layers == (3, 5)
    only5 = cal.as_intervention([5])
    assert only5.layers == (5,)
    hidden = {layer: torch.randn(2, 4, D) for layer in range(7)}  # a 7-layer model's outputs [b, s, d]
    out = {l: (only5.apply(l, h) if l in only5.layers else h) for l, h in hidden.items()}
    for layer in range(7):
        changed = not torch.equal(out[layer], hidden[layer])
        assert changed == (layer == 5)
        assert out[layer].shape == (2, 4, D)
    with pytest.raises(ValueError, match="not steered"):
        cal.as_intervention([4])


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, match", [
    (dict(hidden_size=0), "hidden_size"), (dict(layers=[]), "non-empty"), (dict(layers=[1, 1]), "duplicates"),
    (dict(layers=[-1]), ">= 0"), (dict(width=0), "width"), (dict(w_in=-1.0), "w_in"),
    (dict(w_out=0, w_in=0, w_ortho=0, w_vision=0), "nothing to train"), (dict(val_fraction=1.0), "< 1"),
    (dict(val_fraction=-0.1), "val_fraction"), (dict(patience=3), "val_fraction > 0"), (dict(lr=0.0), "lr"),
    (dict(batch_size=0), "batch_size"), (dict(gate_dim=0), "gate_dim"), (dict(target_scale=float("nan")), "finite"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**bad)


def test_configs_are_frozen_and_round_trip():
    cfg = _cfg()
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert CalibratorConfig(**cfg.to_dict()) == cfg and cfg.layers == (3, 5)
    fit = CrvlmConfig(layers=[5, 3], gate_layer=None, behavioural=BehaviouralConfig(epochs=2))
    assert fit.layers == (3, 5) and CrvlmConfig(**fit.to_dict()) == fit
    assert fit.calibrator_config(hidden_size=D, layers=fit.layers) == CalibratorConfig(
        hidden_size=D, layers=[3, 5], width=1024, lr=3e-4, batch_size=32, epochs=40)


@pytest.mark.parametrize("bad, match", [
    (dict(train_positions="all"), "train_positions"), (dict(gate_layer=-1), "gate_layer"), (dict(lr=0.0), "lr"),
    (dict(layers=[2, 2]), "duplicates"), (dict(patience=2), "val_fraction > 0"), (dict(epochs=0), "epochs"),
    (dict(behavioural="x"), "behavioural"),
])
def test_crvlm_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        CrvlmConfig(**bad)
    with pytest.raises(ValueError, match="refusal_text"):
        BehaviouralConfig(refusal_text="")


def test_training_input_errors():
    x_in, x_out, s = _toy(4)
    cfg = _cfg(epochs=1)
    with pytest.raises(ValueError, match="acts_in is empty"):
        train_calibrator(cfg, x_in[:0], x_out, s, run=QUIET)
    with pytest.raises(ValueError, match="acts_out is empty"):
        train_calibrator(cfg, x_in, x_out[:0], s, run=QUIET)
    with pytest.raises(ValueError, match="hidden size 9 but the config says hidden_size=8"):
        train_calibrator(cfg, torch.randn(4, 2, 9), x_out, s, run=QUIET)
    with pytest.raises(ValueError, match="has 3 layers"):
        train_calibrator(cfg, x_in, torch.randn(4, 3, D), s, run=QUIET)
    with pytest.raises(ValueError, match=r"refusal_vectors must be \[2 layers, 8\]"):
        train_calibrator(cfg, x_in, x_out, s[:1], run=QUIET)
    with pytest.raises(ValueError, match="gate_in and gate_out"):
        train_calibrator(_cfg(gate_dim=4, epochs=1), x_in, x_out, s, run=QUIET)


# ---------------------------------------------------------------------------------------------- training


def test_training_separates_scopes():
    x_in, x_out, s = _toy()
    cal, history = train_calibrator(_cfg(epochs=60), x_in, x_out, s, run=QUIET)
    assert len(history) == 60 and history[-1]["total"] < history[0]["total"]
    with torch.no_grad():
        new_in, rho_in, _ = cal.forward_layers(x_in)
        new_out, rho_out, _ = cal.forward_layers(x_out)
    in_change = (new_in - x_in).norm(dim=-1).mean()
    assert in_change < 0.1 * s.norm(dim=-1).min()
    cos = F.cosine_similarity(new_out - x_out, s.expand_as(x_out), dim=-1)
    assert cos.min() > 0.9
    assert rho_out.mean() > rho_in.mean()


def test_training_is_seeded():
    x_in, x_out, s = _toy(12)
    a, ha = train_calibrator(_cfg(epochs=2), x_in, x_out, s, run=QUIET)
    b, hb = train_calibrator(_cfg(epochs=2), x_in, x_out, s, run=QUIET)
    c, _ = train_calibrator(_cfg(epochs=2, seed=1), x_in, x_out, s, run=QUIET)
    assert _same_state(a, b) and ha == hb
    assert not _same_state(a, c)


def test_shared_variant_trains():
    x_in, x_out, s = _toy()
    cal, history = train_calibrator(_cfg(shared=True, epochs=30), x_in, x_out, s, run=QUIET)
    assert set(cal.blocks) == {"shared"} and cal.layer_embedding.shape == (2, D)
    assert cal.layer_embedding.abs().sum() > 0  # the layer embedding is learned
    assert history[-1]["loss_out"] < 0.7 * history[0]["loss_out"]
    n_shared = sum(p.numel() for p in cal.parameters())
    n_per_layer = sum(p.numel() for p in Calibrator(_cfg()).parameters())
    assert n_shared < n_per_layer


def test_vision_loss_decreases_on_a_toy_problem():
    x_in, x_out, s = _toy(16)
    u = torch.zeros(len(LAYERS), D)
    u[:, 4] = 1.0  # the counterfactual shift points elsewhere than s
    shifts = u.expand(16, -1, -1) + 0.05 * torch.randn(16, len(LAYERS), D, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(16) % 2 == 0  # half the out-of-scope samples have an image
    cfg = _cfg(epochs=25, w_out=0.0, w_ortho=0.0)
    cal, history = train_calibrator(cfg, x_in, x_out, s, vision={"shifts": shifts, "mask": mask}, run=QUIET)
    assert history[0]["loss_vision"] > 0.3
    assert history[-1]["loss_vision"] < 0.3 * history[0]["loss_vision"]
    with pytest.raises(ValueError, match="shifts"):
        train_calibrator(cfg, x_in, x_out, s, vision={"shift": shifts}, run=QUIET)
    with pytest.raises(ValueError, match="mask"):
        train_calibrator(cfg, x_in, x_out, s, vision={"shifts": shifts, "mask": mask.float()}, run=QUIET)


def test_prefill_gated_training_runs():
    x_in, x_out, s = _toy(12)
    g_in, g_out = torch.randn(12, 4) + 1, torch.randn(12, 4) - 1
    cal, history = train_calibrator(_cfg(gate_dim=4, epochs=3), x_in, x_out, s, gate_in=g_in, gate_out=g_out,
                                     run=QUIET)
    assert len(history) == 3 and all(math.isfinite(h["total"]) for h in history)
    assert cal.gate_values(g_out)[3].shape == (12,)


def test_a_hidden_layer_gate_separates_what_a_linear_gate_cannot_and_round_trips(tmp_path):
    """#25: ``gate_hidden`` gives the prefill gate one hidden layer. Gate inputs in and out of scope form an XOR
    (in: same-sign quadrants of two of the eight dimensions, out: opposite-sign), which no linear gate separates; old
    calibrator files (no ``gate_hidden`` key) still load as the linear gate."""
    x_in, x_out, s = _toy(64)
    g = torch.Generator().manual_seed(1)
    corners = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    g_in = torch.cat([corners[torch.randint(0, 2, (64,), generator=g)], torch.zeros(64, 6)], 1) \
        + 0.2 * torch.randn(64, 8, generator=g)
    g_out = torch.cat([corners[torch.randint(2, 4, (64,), generator=g)], torch.zeros(64, 6)], 1) \
        + 0.2 * torch.randn(64, 8, generator=g)

    def gate_accuracy(cal):
        with torch.no_grad():
            return float(((cal.gate_values(g_in)[3] < 0.5).float().mean() +
                          (cal.gate_values(g_out)[3] > 0.5).float().mean()) / 2)

    kw = dict(gate_dim=8, epochs=60, lr=1e-2)
    mlp, _ = train_calibrator(_cfg(gate_hidden=16, **kw), x_in, x_out, s, gate_in=g_in, gate_out=g_out, run=QUIET)
    linear, _ = train_calibrator(_cfg(**kw), x_in, x_out, s, gate_in=g_in, gate_out=g_out, run=QUIET)
    assert gate_accuracy(mlp) > 0.95 and gate_accuracy(linear) < 0.8
    mlp.save(tmp_path / "mlp")
    back = Calibrator.load(tmp_path / "mlp")
    assert back.config.gate_hidden == 16 and _same_state(back, mlp)
    linear.save(tmp_path / "linear")
    meta = json.loads((tmp_path / "linear" / CALIBRATOR_JSON).read_text())
    del meta["config"]["gate_hidden"]  # a file written before the option existed
    (tmp_path / "linear" / CALIBRATOR_JSON).write_text(json.dumps(meta))
    assert _same_state(Calibrator.load(tmp_path / "linear"), linear)
    with pytest.raises(ValueError, match="gate_hidden"):
        _cfg(gate_hidden=-1)


def test_a_probe_fitted_gate_separates_badly_scaled_inputs_and_stays_frozen():
    """#25: ``gate_fit="probe"`` fits the linear gate alone as a standardised logistic regression, then freezes it.
    The scope is told by a feature a thousand times smaller than a noise feature: the probe gets it right from the
    start, and training the flow network leaves the gate as the probe set it."""
    x_in, x_out, s = _toy(64)
    g = torch.Generator().manual_seed(2)
    noise = 1000.0 * torch.randn(128, 1, generator=g)
    signal = torch.cat([torch.full((64, 1), -0.01), torch.full((64, 1), 0.01)])
    signal = signal * (1 + 0.3 * torch.rand(128, 1, generator=g))
    gates = torch.cat([signal, noise, torch.zeros(128, 2)], 1)
    g_in, g_out = gates[:64], gates[64:]
    cfg = _cfg(gate_dim=4, gate_fit="probe", epochs=5)
    probed = Calibrator(cfg)
    fit_probe_gate(probed, g_in, g_out)
    cal, _ = train_calibrator(cfg, x_in, x_out, s, gate_in=g_in, gate_out=g_out, run=QUIET)
    with torch.no_grad():
        assert bool((cal.gate_values(g_in)[3] < 0.5).all() and (cal.gate_values(g_out)[3] > 0.5).all())
    for layer in LAYERS:
        gate, start = cal.blocks[str(layer)].gate, probed.blocks[str(layer)].gate
        assert not gate.weight.requires_grad and torch.equal(gate.weight, start.weight)
        assert torch.equal(gate.bias, start.bias)
    with pytest.raises(ValueError, match="gate_fit"):
        _cfg(gate_fit="bogus")
    with pytest.raises(ValueError, match="linear prefill gate"):
        _cfg(gate_dim=4, gate_fit="probe", gate_hidden=8)
    with pytest.raises(ValueError, match="prefill gate layer"):
        CrvlmConfig(gate_fit="probe", gate_layer=None)


def test_validation_and_early_stopping():
    x_in, x_out, s = _toy(20)
    cfg = _cfg(epochs=40, val_fraction=0.25, patience=2, lr=5e-2)
    cal, history = train_calibrator(cfg, x_in, x_out, s, run=QUIET)
    assert all("val_total" in h and "val_loss_out" in h for h in history)
    assert len(history) < 40  # stopped early
    best = min(history, key=lambda h: h["val_total"])["epoch"]
    assert len(history) == best + 2
    # the returned weights are the best validation epoch's: a plain run of `best` epochs gives the same
    plain, _ = train_calibrator(_cfg(epochs=best, val_fraction=0.25, lr=5e-2), x_in, x_out, s, run=QUIET)
    assert _same_state(cal, plain)
    with pytest.raises(ValueError, match="leaves no"):
        train_calibrator(_cfg(val_fraction=0.5), x_in[:1], x_out, s, run=QUIET)


# ---------------------------------------------------------------------------------------------- resume, save/load


def test_resume_reaches_the_uninterrupted_weights(tmp_path):
    x_in, x_out, s = _toy(20)
    full, h_full = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=QUIET)

    # stop after 3 epochs, then ask for 6
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"
    run = TrainRun(cache_dir=ckpt, log_path=log, progress=False)
    part, _ = train_calibrator(_cfg(epochs=3), x_in, x_out, s, run=run)
    assert not _same_state(part, full)
    resumed, h_res = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=run)
    assert _same_state(resumed, full) and h_res == h_full
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_after_crash_identical_weights(tmp_path):
    x_in, x_out, s = _toy(20)
    full, h_full = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=QUIET)
    ckpt, log = tmp_path / "ckpt", tmp_path / "log.jsonl"

    def crash(epoch, entry):
        if epoch == 5:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_calibrator(_cfg(epochs=6), x_in, x_out, s,
                         run=TrainRun(cache_dir=ckpt, log_path=log, checkpoint_every=2, callback=crash, progress=False))
    assert len(log.read_text().splitlines()) == 5
    seen = []
    resumed, h_res = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=TrainRun(
        cache_dir=ckpt, log_path=log, checkpoint_every=2, callback=lambda e, _: seen.append(e), progress=False))
    assert seen == [5, 6]  # resumed from the epoch-4 checkpoint
    assert _same_state(resumed, full) and h_res == h_full
    assert len(log.read_text().splitlines()) == 6  # the interrupted run's stale epoch-5 line is gone
    # a finished run returns at once with the same weights; other data or config → a fresh run
    again, _ = train_calibrator(_cfg(epochs=6), x_in, x_out, s,
                                run=TrainRun(cache_dir=ckpt, callback=lambda e, _: seen.append(e), progress=False))
    assert seen == [5, 6] and _same_state(again, full)
    other, _ = train_calibrator(_cfg(epochs=6), x_in, x_out + 1, s, run=TrainRun(cache_dir=ckpt, progress=False))
    assert not _same_state(other, full)
    assert len(list(ckpt.iterdir())) == 2


def test_resume_after_sigkill_identical_weights(tmp_path):
    """A fit killed outright (SIGKILL: no cleanup runs) resumes from its cached checkpoint to the same weights."""
    import signal
    import subprocess
    import sys

    x_in, x_out, s = _toy(20)
    full, h_full = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=QUIET)
    torch.save({"x_in": x_in, "x_out": x_out, "s": s, "cfg": _cfg(epochs=6).to_dict()}, tmp_path / "data.pt")
    script = (
        "import os, signal, sys, torch\n"
        "from crvlm_core.methods.crvlm.config import CalibratorConfig\n"
        "from crvlm_core.methods.crvlm.train import TrainRun, fit_probe_gate, train_calibrator\n"
        "torch.set_num_threads(1)\n"
        "d = torch.load(sys.argv[1])\n"
        "def kill(epoch, entry):\n"
        "    if epoch == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "train_calibrator(CalibratorConfig(**d['cfg']), d['x_in'], d['x_out'], d['s'],\n"
        "                 run=TrainRun(cache_dir=sys.argv[2], checkpoint_every=2, callback=kill, progress=False))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data.pt"), str(tmp_path / "ckpt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    seen = []
    resumed, h_res = train_calibrator(_cfg(epochs=6), x_in, x_out, s, run=TrainRun(
        cache_dir=tmp_path / "ckpt", checkpoint_every=2, callback=lambda e, _: seen.append(e), progress=False))
    assert seen == [5, 6] and _same_state(resumed, full) and h_res == h_full


def test_damaged_checkpoint_is_recomputed(tmp_path):
    x_in, x_out, s = _toy(12)
    run = TrainRun(cache_dir=tmp_path, progress=False)
    first, _ = train_calibrator(_cfg(epochs=2), x_in, x_out, s, run=run)
    (ckpt,) = tmp_path.glob("calibrator-ckpt-*.pt")
    ckpt.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable checkpoint"):
        again, history = train_calibrator(_cfg(epochs=2), x_in, x_out, s, run=run)
    assert len(history) == 2 and _same_state(again, first)
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainRun(checkpoint_every=0)


def test_save_load_round_trip(tmp_path):
    x_in, x_out, s = _toy(12)
    cal, _ = train_calibrator(_cfg(epochs=2, shared=True), x_in, x_out, s,
                              run=TrainRun(progress=False, model_spec="tiny", n_model_layers=7))
    cal.save(tmp_path / "cal")
    assert {p.name for p in (tmp_path / "cal").iterdir()} == {CALIBRATOR_JSON, CALIBRATOR_SAFETENSORS}
    meta = json.loads((tmp_path / "cal" / CALIBRATOR_JSON).read_text())
    assert meta["format_version"] == 1 and meta["model_spec"] == "tiny" and meta["config"]["shared"] is True
    assert len(meta["data_fingerprint"]) == 64 and len(meta["vector_fingerprint"]) == 64
    back = Calibrator.load(tmp_path / "cal")
    assert _same_state(back, cal) and back.data_fingerprint == cal.data_fingerprint
    assert back.config == cal.config and back.n_model_layers == 7
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        for layer in LAYERS:
            assert torch.equal(back(x, layer)[0], cal(x, layer)[0])
    # a tampered weights file is detected
    Calibrator(_cfg(shared=True, seed=9)).save(tmp_path / "other")
    (tmp_path / "cal" / CALIBRATOR_SAFETENSORS).write_bytes((tmp_path / "other" / CALIBRATOR_SAFETENSORS).read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        Calibrator.load(tmp_path / "cal")
    with pytest.raises(FileNotFoundError):
        Calibrator.load(tmp_path / "missing")


def test_check_compatible():
    cal = Calibrator(_cfg(), n_model_layers=7)
    cal.check_compatible(7, D)
    with pytest.raises(ValueError, match="calibrator was trained on hidden size 8 .*; this model has 16"):
        cal.check_compatible(7, 16)
    with pytest.raises(ValueError, match="7 layers; this model has 12"):
        cal.check_compatible(12, D)
    with pytest.raises(ValueError, match=r"steers layers \[5\]"):
        Calibrator(_cfg()).check_compatible(5, D)


def test_hook_through_steered_logits_and_generate_on_a_tiny_model():
    """The intervention runs inside nnsight traces: per-row gate override 0 reproduces the plain model exactly."""
    from crvlm_core.models.loading import load_model
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.steer.score import steered_logits

    handle = load_model("tiny-llava")
    cal = Calibrator(CalibratorConfig(hidden_size=handle.hidden_size, layers=[1], width=16, seed=0),
                     n_model_layers=handle.n_layers)
    cal.check_compatible(handle.n_layers, handle.hidden_size)
    prompts = ["hello there", "hi"]
    enc = handle.build_inputs(prompts)
    base = steered_logits(handle, enc)
    assert not torch.allclose(steered_logits(handle, enc, [cal.as_intervention()]), base)
    with cal.gate_override(torch.tensor([0.0, 0.0])):
        assert torch.equal(steered_logits(handle, enc, [cal.as_intervention()]), base)
    with torch.no_grad():
        cal.blocks["1"].alpha.fill_(50.0)
    plain = steered_generate(handle, prompts, max_new_tokens=4)
    with cal.gate_override(torch.tensor([0.0, 1.0])):  # steer only the second prompt, prompt pass and every token
        steered = steered_generate(handle, prompts, [cal.as_intervention()], max_new_tokens=4)
    assert steered[0] == plain[0] and steered[1] != plain[1]


def test_a_probe_gate_weighs_both_scopes_equally_however_many_questions_each_has():
    """#25: 30 in-scope vs 600 out-of-scope gate states that overlap (two unit Gaussians one σ apart); an unweighted
    probe would call most in-scope states out of scope (the prior of the larger scope); the class-balanced probe
    keeps both scopes' accuracy near the 0.69 of the midpoint threshold."""
    g = torch.Generator().manual_seed(3)
    g_in = torch.cat([torch.randn(30, 1, generator=g) - 0.5, torch.randn(30, 3, generator=g)], 1)
    g_out = torch.cat([torch.randn(600, 1, generator=g) + 0.5, torch.randn(600, 3, generator=g)], 1)
    cal = Calibrator(_cfg(gate_dim=4, gate_fit="probe"))
    fit_probe_gate(cal, g_in, g_out)
    with torch.no_grad():
        in_right = float((cal.gate_values(g_in)[3] < 0.5).float().mean())
        out_right = float((cal.gate_values(g_out)[3] > 0.5).float().mean())
    assert in_right > 0.5 and out_right > 0.5, (in_right, out_right)
