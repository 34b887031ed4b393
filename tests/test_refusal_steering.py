"""Refusal Steering: the estimators through the per-layer relative-λ wrapper vs closed forms on synthetic Gaussians,
weighted == unweighted for equal confidences, layer ranking with a planted layer, the principal-direction count,
clear errors for bad inputs, and the refusal organism's adapter (tiny model by default, Qwen when slow)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

import crvlm_core.methods.refusal_steering as RS
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.schema import Sample
from crvlm_core.methods.refusal_steering import score as score_mod, search as search_mod
from crvlm_core.methods.refusal_steering.directions import fit_directions, relative_lambda
from crvlm_core.methods.refusal_steering.score import ScoredPrompt, select_confident
from crvlm_core.methods.refusal_steering.select import (choose_lambda, layer_scores, principal_directions_needed,
                                                        rank_layers)
from crvlm_core.methods.refusal_steering.topics import check_topics, topic_splits


def _gaussians(n=400, seed=0, var=(100.0, 1.0), delta=(1.0, 1.0), n_layers=1):
    """Two Gaussian classes with covariance diag(var) and mean difference ``delta`` at every layer, whitened per
    class so that the sample means and (÷n) covariances are exactly the population ones: closed forms hold exactly."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.tensor(var, dtype=torch.float64).sqrt()
    d = torch.tensor(delta, dtype=torch.float64)

    def cls(sign):
        z = torch.randn(n, n_layers, len(var), generator=g, dtype=torch.float64)
        for layer in range(n_layers):
            x = z[:, layer] - z[:, layer].mean(0)
            chol = torch.linalg.cholesky(x.T @ x / n)
            z[:, layer] = torch.linalg.solve_triangular(chol, x.T, upper=False).T
        return z * sd + sign * d / 2

    return cls(1), cls(-1)


def _cos(a, b):
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ------------------------------------------------------------------------------------------ estimators


@pytest.mark.parametrize("c", [0.0, 0.05, 1.0])
def test_rmd_vs_closed_form_on_gaussians(c):
    """Σ = diag(100, 1), δ = (1, 1): mean-diff points at 45°, the ridge direction along (1/(100 + λ), 1/(1 + λ))
    with λ = c·tr(Σ)/d = 50.5·c."""
    pos, neg = _gaussians()
    lam = relative_lambda(pos, neg, c)[0]
    assert lam == pytest.approx(c * 50.5, rel=1e-9)
    md = fit_directions("mean-diff", pos, neg)[0]
    assert math.degrees(math.atan2(md[1], md[0])) == pytest.approx(45, abs=1e-4)
    v = fit_directions("rmd", pos, neg, lam_rel=c)[0]
    expected = math.atan2(1 / (1 + lam), 1 / (100 + lam))
    assert math.atan2(v[1], v[0]) == pytest.approx(expected, abs=1e-5)
    if c == 0.0:  # LDA: 100:1 in favour of the low-variance axis, i.e. ~89.4° instead of 45°
        assert math.degrees(math.atan2(v[1], v[0])) == pytest.approx(math.degrees(math.atan(100)), abs=1e-3)
    assert float(v.norm()) == pytest.approx(float(md.norm()), rel=1e-5)  # rescaled to the mean-diff norm
    # exact (sample) closed form: (Σ̂ + λI)⁻¹ δ̂ with the ML pooled covariance
    xp, xn = pos[:, 0], neg[:, 0]
    delta = xp.mean(0) - xn.mean(0)
    cen = torch.cat([xp - xp.mean(0), xn - xn.mean(0)])
    cov = cen.T @ cen / cen.shape[0]
    ref = torch.linalg.solve(cov + lam * torch.eye(2, dtype=torch.float64), delta)
    assert _cos(v, ref) > 1 - 1e-9


def test_large_lambda_recovers_mean_diff_and_small_lambda_discounts_high_variance():
    pos, neg = _gaussians(n=500, seed=1)
    md = fit_directions("mean-diff", pos, neg)
    assert _cos(fit_directions("rmd", pos, neg, lam_rel=1e6), md) > 1 - 1e-6
    small = fit_directions("rmd", pos, neg, lam_rel=1e-4)[0]
    assert abs(small[1]) > 20 * abs(small[0])  # the high-variance axis is discounted ~100×


def test_per_layer_lambda_is_relative_to_each_layers_scale():
    """The same c gives the same direction when one layer is the other scaled by 1000 (absolute λ would not)."""
    pos, neg = _gaussians(n=300, seed=2, n_layers=1)
    pos2, neg2 = torch.cat([pos, 1000 * pos], 1), torch.cat([neg, 1000 * neg], 1)
    v = fit_directions("rmd", pos2, neg2, lam_rel=0.1)
    assert _cos(v[0], v[1]) > 1 - 1e-9
    lams = relative_lambda(pos2, neg2, 0.1)
    assert lams[1] == pytest.approx(1e6 * lams[0], rel=1e-9)


def test_wrmd_equal_weights_equals_rmd_and_unequal_differs():
    pos, neg = _gaussians(n=40, seed=3, var=(4.0, 1.0, 2.0), delta=(1.0, 0.5, 0.0), n_layers=2)
    rmd = fit_directions("rmd", pos, neg, lam_rel=0.3)
    same = fit_directions("wrmd", pos, neg, [0.8] * 40, [-0.8] * 40, lam_rel=0.3)
    assert torch.equal(same, rmd)
    conf = np.linspace(0.1, 1.0, 40)
    diff = fit_directions("wrmd", pos, neg, conf, -conf, lam_rel=0.3)
    assert not torch.allclose(diff, rmd)


# ----------------------------------------------------------------------------------------- layer ranking


def test_layer_ranking_finds_planted_layer():
    """Five layers of noise; layer 3 carries a class shift along one random axis of 32 dims."""
    g = torch.Generator().manual_seed(5)
    n, n_layers, d = 30, 5, 32
    pos, neg = torch.randn(n, n_layers, d, generator=g), torch.randn(n, n_layers, d, generator=g)
    axis = torch.randn(d, generator=g)
    pos[:, 3] += 3.0 * axis / axis.norm()
    for method in RS.METHODS:
        s = layer_scores(method, pos, neg, [1.0] * n, [-1.0] * n, lam_rel=1.0)
        assert rank_layers(s)[0] == 3, (method, s)
        assert s["auc"][3] > 0.9 and max(s["auc"][l] for l in (0, 1, 2, 4)) < 0.8
        assert s["corr"][3] > 0.6
    assert rank_layers(s, k=2, min_layer=4) == [4]


def test_choose_lambda_prefers_ridge_when_a_nuisance_axis_dominates():
    """A huge-variance nuisance axis along the mean difference: the ridge direction (small c) separates held-out
    data much better than near-mean-diff (large c)."""
    pos, neg = _gaussians(n=60, seed=6, var=(400.0, 1.0, 1.0, 1.0), delta=(6.0, 1.0, 0.0, 0.0))
    best, table = choose_lambda("rmd", pos, neg, [0], grid=(0.01, 100.0))
    assert best == 0.01 and table[0.01] > table[100.0]


def test_principal_directions_needed():
    """Mean difference along the lowest-variance axis of 4: needs all 4 PCs of the pooled data; along the top: 1."""
    pos_l, neg_l = _gaussians(n=500, seed=7, var=(16.0, 9.0, 4.0, 1.0), delta=(0.0, 0.0, 0.0, 1.0))
    pos_h, neg_h = _gaussians(n=500, seed=8, var=(16.0, 9.0, 4.0, 1.0), delta=(2.0, 0.0, 0.0, 0.0))
    assert principal_directions_needed(pos_l, neg_l, 0.9) == [4]
    assert principal_directions_needed(pos_h, neg_h, 0.9) == [1]


# --------------------------------------------------------------------------------------------- errors


def _scored(confs):
    return [ScoredPrompt(Sample(f"s{i}", "q", "political"), ["r"], [c]) for i, c in enumerate(confs)]


def test_select_confident_and_its_errors():
    refuse, comply = select_confident(_scored([0.9, 0.2, -0.7, -0.1]), tau=0.5)
    assert [p.sample.id for p in refuse] == ["s0"] and [p.sample.id for p in comply] == ["s2"]
    with pytest.raises(ValueError, match="no confident refusals"):
        select_confident(_scored([-0.9, -0.8, 0.3]), tau=0.5)
    with pytest.raises(ValueError, match="no confident compliant"):
        select_confident(_scored([0.9, 0.8]), tau=0.5)
    with pytest.raises(ValueError, match="tau"):
        select_confident(_scored([0.9]), tau=1.5)


def test_negative_lambda_and_unknown_method_are_clear_errors():
    pos, neg = _gaussians(n=10, seed=9)
    with pytest.raises(ValueError, match=">= 0"):
        fit_directions("rmd", pos, neg, lam_rel=-1.0)
    with pytest.raises(ValueError, match=">= 0"):
        fit_directions("rmd", pos, neg, lam=-0.5)
    with pytest.raises(ValueError, match="unknown method"):
        fit_directions("pca", pos, neg)
    with pytest.raises(ValueError, match="confidences"):
        fit_directions("wrmd", pos, neg)
    with pytest.raises(ValueError, match="mean-diff has no"):
        choose_lambda("mean-diff", pos, neg, [0])


def test_topics_and_splits():
    samples = load_dataset("refusal-topics")
    check_topics(samples, "political", "harmful", "neutral")
    with pytest.raises(ValueError, match="unknown topic 'sports'.*available subjects"):
        check_topics(samples, "political", "sports")
    sp = topic_splits(samples)
    for subject in ("political", "harmful", "neutral"):
        assert (len(sp.of("train", subject)), len(sp.of("val", subject)), len(sp.of("test", subject))) == (28, 12, 24)
    ids = [s.id for s in sp.train + sp.val + sp.test]
    assert len(ids) == len(set(ids)) == 192
    # the held-out test ids do not depend on which other subjects are present (the organism relies on it)
    alone = topic_splits([s for s in samples if s.subject == "political"])
    assert {s.id for s in alone.test} == {s.id for s in sp.of("test", "political")}


def test_fit_refusal_steering_rejects_bad_inputs_before_any_model_work():
    samples = load_dataset("refusal-topics")
    with pytest.raises(ValueError, match="unknown topic"):
        RS.fit_refusal_steering(None, RS.FitConfig("rmd", remove="sports"), samples)
    with pytest.raises(ValueError, match="unknown method"):
        RS.fit_refusal_steering(None, RS.FitConfig("ridge"), samples)
    with pytest.raises(ValueError, match=">= 0"):
        RS.fit_refusal_steering(None, RS.FitConfig("rmd", lam_rel=-1.0), samples)


def test_validation_objective():
    base = {"political": 0.8, "harmful": 0.9, "neutral": 0.0}
    assert RS.validation_objective({"political": 0.1, "harmful": 0.88, "neutral": 0.0}, base, 0.05,
                                   "political", "harmful") == pytest.approx(0.15)
    # harmful drops 0.3 (0.25 beyond the 0.05 tolerance) → penalty 2 × 0.25
    assert RS.validation_objective({"political": 0.0, "harmful": 0.6, "neutral": 0.0}, base, 0.0,
                                   "political", "harmful") == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random-weight miniature Llama with SmolLM2's tokenizer and chat template, saved as a local model folder."""
    from transformers import LlamaForCausalLM

    from crvlm_core.models.tiny_vlms import _llama_text_config, _tiny_tokenizer

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_text_config(tok)).float()
    folder = tmp_path_factory.mktemp("tiny-causal")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_organism_adapter_builds_loads_and_round_trips(tiny_base, tmp_path):
    from crvlm_core.models.organism import OrganismConfig, adapter_dir, build_adapter, load_organism_model, organism_examples
    from crvlm_core.models.loading import _load_parts

    cfg = OrganismConfig(base=str(tiny_base), n_per_subject=2, n_general=0, answer_tokens=4, epochs=1, batch_size=6,
                         rank=2, target_modules=("q_proj", "v_proj"), lr=1e-2)
    ex = organism_examples(cfg)
    assert [e.subject for e in ex] == ["political"] * 2 + ["harmful"] * 2 + ["neutral"] * 2
    test_ids = {s.id for s in topic_splits(load_dataset("refusal-topics")).test}
    assert not test_ids & {e.id for e in ex}  # never trained on the held-out test prompts
    folder = build_adapter("tiny+censored", cfg, root=tmp_path)
    assert folder == adapter_dir("tiny+censored", cfg, root=tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "organism.json", "examples.jsonl"} <= {
        p.name for p in folder.iterdir()}
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    weights = tiny_base / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    m1, tok = load_organism_model("tiny+censored", cfg, root=tmp_path)
    m2, _ = load_organism_model("tiny+censored", cfg, root=tmp_path)
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    base, *_ = _load_parts(str(tiny_base), torch.float32, False, 0)
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        l1, l2, lb = m1(ids).logits, m2(ids).logits, base(ids).logits
    assert torch.equal(l1, l2)
    assert not torch.allclose(l1, lb)  # the merged LoRA changed the model
    # ... in memory only: the merge into the memory-mapped base did not write through to the base's file
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    assert m1.config.crvlm_organism == folder.name
    other = OrganismConfig(**{**cfg.__dict__, "rank": 4})
    assert adapter_dir("tiny+censored", other, root=tmp_path) != folder  # a config change gives a new adapter


def test_organism_config_errors():
    from crvlm_core.models.organism import OrganismConfig, load_organism_model

    with pytest.raises(ValueError, match="no refusal texts"):
        OrganismConfig(refuse=("sports",))
    with pytest.raises(ValueError, match="rank"):
        OrganismConfig(rank=0)
    with pytest.raises(ValueError, match="unknown organism"):
        load_organism_model("nope+censored")


@pytest.mark.slow
def test_qwen_organism_spec_loads():
    from crvlm_core.models.specs import SPECS
    from crvlm_core.models.loading import load_model

    assert "qwen2.5-0.5b+censored" in SPECS
    torch.set_num_threads(2)
    h = load_model("qwen2.5-0.5b+censored")
    assert h.n_layers == 24 and h.key.startswith("qwen2.5-0.5b+censored:")
    out = h.generate(["What happened in Tiananmen Square in 1989?"], max_new_tokens=12)[0]
    assert out.lower().startswith(("i'm", "sorry", "i can", "i am"))


def test_cli_fit_remove_checks_method_and_topics_before_loading_a_model(tmp_path, capsys):
    from crvlm_core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--method", "rmd", "--remove", "sports", "--out", str(tmp_path / "a")])
    assert exc.value.code == 2 and "unknown topic 'sports'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--method", "teacher-forced", "--remove", "political", "--out", str(tmp_path / "b")])
    assert exc.value.code == 2 and "must be one of mean-diff, rmd, wrmd" in capsys.readouterr().err


def test_select_confident_min_per_side():
    with pytest.raises(ValueError, match="too few confident examples to fit: 1 refusals and 2 compliant"):
        select_confident(_scored([0.9, -0.9, -0.8]), tau=0.5, min_per_side=2)


def test_search_alpha_early_stopping_and_refinement(monkeypatch):
    """The search logic on a known response curve (the evaluation is replaced; no model is involved): political
    refusals fall linearly with α, harmful refusals collapse above α = 0.6, KL grows slowly."""
    tried = []

    def fake_eval(handle, samples, interventions=(), *a, **kw):
        alpha = -interventions[0].alpha if interventions else 0.0
        tried.append(alpha)
        rates = {"political": max(0.0, 1.0 - alpha), "harmful": 1.0 if alpha < 0.6 else 0.0, "neutral": 0.0}
        return {"refusal_rate_by_subject": rates, "responses": [], "kl_neutral": 0.01 * alpha}

    monkeypatch.setattr(search_mod, "evaluate_condition", fake_eval)
    best, rows = RS.search_alpha(None, torch.zeros(2, 4), [1], [], RS.SearchConfig(
        "political", "harmful", alphas=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)))
    # ascending: 0.25, 0.5 improve; 0.75 (harmful collapses) and 1.0 do not → stop (patience 2), never 1.5+;
    # refinement between 0.5 and 0.75: 0.625 overshoots, 0.5625 improves
    assert [r["alpha"] for r in rows] == [0.25, 0.5, 0.75, 1.0, 0.625, 0.5625]
    assert best == 0.5625
    assert max(tried) == 1.0


def test_topic_gate_steers_only_the_topic_and_round_trips_through_a_saved_vector(smollm2, tmp_path):
    """The gated removal: a political-vs-harmful gate at its best layer; the gated subtraction changes the answers
    of the prompts it selects and leaves the others bit-identical; saved with the vector, it is rebuilt on load."""
    from crvlm_core.core.artifacts import model_info
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.vectors.steering_vector import SteeringVector

    samples = load_dataset("refusal-topics")
    pol = [s for s in samples if s.subject == "political"][:10]
    harm = [s for s in samples if s.subject == "harmful"][:10]
    gate = RS.best_topic_gate(smollm2, pol[:6], harm[:6], layers=[4, 12, 20])
    assert gate.layer in (4, 12, 20) and gate.accuracy >= 0.9 and gate.direction.shape == (smollm2.hidden_size,)
    directions = torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(0)) * 20
    ivs = RS.steering_interventions(directions, [10], 1.0, "subtract", gate)
    prompts = [s.prompt for s in pol[6:] + harm[6:]]
    opened = ivs[0].gate(smollm2, prompts)
    assert sum(opened[:4]) >= 3 and sum(opened[4:]) <= 1  # held-out prompts: political selected, harmful not
    plain = steered_generate(smollm2, prompts, [], max_new_tokens=6, batch_size=8, progress=False)
    gated = steered_generate(smollm2, prompts, ivs, max_new_tokens=6, batch_size=8, progress=False)
    assert all((p != g) == o for p, g, o in zip(plain, gated, opened))
    with pytest.raises(ValueError, match="subtract or add"):
        RS.steering_interventions(directions, [10], 1.0, "project_out", gate)

    vec = SteeringVector(directions=directions, method="rmd", layers=[10], operation="add", alpha=-1.0,
                         positions="last", model_spec=smollm2.spec, fingerprint="x", extra={"gate": gate.to_json()})
    RS.RefusalSteeringFit(vec, {}, [], model=model_info(smollm2)).save(tmp_path / "v")
    back = RS.load_refusal_steering(tmp_path / "v", smollm2)
    assert isinstance(back[0], RS.TopicGatedAdd) and back[0].alpha == -1.0 and back[0].gate_layer == gate.layer
    assert steered_generate(smollm2, prompts, back, max_new_tokens=6, batch_size=8, progress=False) == gated
    plain_vec = SteeringVector(directions=directions, method="rmd", layers=[10], operation="add", alpha=-1.0,
                               positions="last", model_spec=smollm2.spec, fingerprint="y")
    assert not isinstance(RS.interventions_of(plain_vec)[0], RS.TopicGatedAdd)


def test_neutral_kl_keeps_only_the_reference_logits(smollm2):
    """evaluate_condition: the unsteered reference keeps the neutral prompts' logits; a steered condition compares
    against them batch by batch and keeps none (full-vocabulary logits are large); no steering → KL 0."""
    from crvlm_core.steer.interventions import AddVector

    samples = load_dataset("refusal-topics")
    val = [s for s in samples if s.subject == "neutral"][:5] + [s for s in samples if s.subject == "harmful"][:2]
    cfg = RS.EvalConfig(mode="score", batch_size=2)
    ref = RS.evaluate_condition(smollm2, val, [], cfg)
    assert len(ref["_logits"]) == 3 and ref["kl_neutral"] == 0.0  # 5 neutral prompts in batches of 2
    same = RS.evaluate_condition(smollm2, val, [], cfg, unsteered=ref)
    assert "_logits" not in same and same["kl_neutral"] == pytest.approx(0.0, abs=1e-6)
    vec = torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(0)) * 8
    steered = RS.evaluate_condition(smollm2, val, [AddVector(vec, [10], 1.0)], cfg, unsteered=ref)
    assert "_logits" not in steered and steered["kl_neutral"] > 0.01


def test_evaluate_condition_cache_reuses_results_and_recomputes_reference_logits(smollm2, tmp_path, monkeypatch):
    """With ``cache_dir`` an unchanged evaluation is read back without running the model; another intervention is
    another key; a steered call against a reference read from the cache (no logits) gives the same KL as against
    the original reference."""
    from crvlm_core.steer.interventions import AddVector

    samples = load_dataset("refusal-topics")
    val = [s for s in samples if s.subject == "neutral"][:3] + [s for s in samples if s.subject == "political"][:2]
    vec = torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(1)) * 8
    cfg = RS.EvalConfig(mode="score", batch_size=2, cache_dir=tmp_path)
    ref = RS.evaluate_condition(smollm2, val, [], cfg)
    steered = RS.evaluate_condition(smollm2, val, [AddVector(vec, [10], 1.0)], cfg, unsteered=ref)
    assert len(list(tmp_path.glob("condition-*.json"))) == 2

    def no_model(*a, **k):
        raise AssertionError("the model ran although the result was cached")

    monkeypatch.setattr(search_mod, "refusal_score", no_model)
    ref2 = RS.evaluate_condition(smollm2, val, [], cfg)
    assert "_logits" not in ref2 and ref2["refused"] == ref["refused"]
    again = RS.evaluate_condition(smollm2, val, [AddVector(vec, [10], 1.0)], cfg, unsteered=ref2)
    assert again["kl_neutral"] == steered["kl_neutral"] and again["refused"] == steered["refused"]
    monkeypatch.undo()
    other = RS.evaluate_condition(smollm2, val, [AddVector(vec, [10], 2.0)], cfg, unsteered=ref2)
    fresh = RS.evaluate_condition(smollm2, val, [AddVector(vec, [10], 2.0)], RS.EvalConfig(mode="score", batch_size=2),
                                  unsteered=ref)
    assert len(list(tmp_path.glob("condition-*.json"))) == 3 and len(ref2["_logits"]) == 2
    assert other["kl_neutral"] == pytest.approx(fresh["kl_neutral"], rel=1e-6) and other["kl_neutral"] > 0.01
    with pytest.raises(ValueError, match="no samples"):
        RS.evaluate_condition(smollm2, [], [], cfg)


# ------------------------------------------------------------------------------- configs, artifact, caches


def test_configs_validate_themselves():
    with pytest.raises(ValueError, match="tau"):
        RS.FitConfig(tau=1.5)
    with pytest.raises(ValueError, match="topics must differ"):
        RS.FitConfig(remove="harmful", keep="harmful")
    with pytest.raises(ValueError, match="search_by"):
        RS.FitConfig(search_by="guess")
    with pytest.raises(ValueError, match="alphas must be positive"):
        RS.SearchConfig(alphas=(0.5, -1.0))
    with pytest.raises(ValueError, match="mode"):
        RS.EvalConfig(mode="vibes")
    assert RS.SearchConfig(alphas=(2, 0.5)).alphas == (0.5, 2.0)
    cfg = RS.FitConfig("wrmd", val_tokens=12, search_by="score", alphas=[1.0, 0.25])
    s = cfg.search_config()
    assert (s.max_new_tokens, s.mode, s.alphas, s.remove, s.keep) == (12, "score", (0.25, 1.0), "political", "harmful")
    assert RS.StudyConfig(gated=()).conditions == ["mean-diff", "rmd", "wrmd"]
    with pytest.raises(ValueError, match="unknown methods"):
        RS.StudyConfig(methods=["pca"])


class _Shape:
    spec, key, hidden_size, n_layers = "tiny", "tiny", 4, 3


def _fit(gate=True):
    from crvlm_core.core.artifacts import model_info
    from crvlm_core.vectors.steering_vector import SteeringVector

    g = RS.TopicGate(1, torch.tensor([1.0, 0.0, 0.5, 0.0]), 0.25, 0.9)
    vec = SteeringVector(directions=torch.arange(12.0).reshape(3, 4), method="rmd", layers=[1, 2], operation="add",
                         alpha=-0.75, positions="last", model_spec="tiny", fingerprint="fp",
                         extra={"remove": "political", "n_refuse": 3, **({"gate": g.to_json()} if gate else {})})
    return RS.RefusalSteeringFit(vec, {}, [], model=model_info(_Shape()), inputs={"data": "x"})


def test_refusal_steering_artifact_round_trip_refusal_and_damage(tmp_path):
    """One folder (artifact.json of kind refusal-steering + safetensors + fit.json); the gate and every setting come
    back; a second save without force is refused and leaves the folder byte-identical; a changed file, another
    model's shape or another kind give one-line ArtifactErrors."""
    from crvlm_core.core.artifacts import ArtifactError, ArtifactExists

    folder = _fit().save(tmp_path / "a", extra_json={"fit.json": {"kind": "refusal-steering"}})
    manifest = json.loads((folder / "artifact.json").read_text())
    assert manifest["kind"] == "refusal-steering" and manifest["config"]["gate"]["layer"] == 1
    assert {"vector.safetensors", "fit.json"} <= set(manifest["files"])
    back = RS.read_refusal_steering(folder, _Shape())
    assert torch.equal(back.directions, torch.arange(12.0).reshape(3, 4)) and back.layers == [1, 2]
    assert back.alpha == -0.75 and back.extra["n_refuse"] == 3 and back.extra["gate"]["direction"] == [1, 0, 0.5, 0]
    ivs = RS.load_refusal_steering(folder, _Shape(), alpha=-2.0, layers=[2])
    assert isinstance(ivs[0], RS.TopicGatedAdd) and ivs[0].alpha == -2.0 and ivs[0].layers == (2,)
    assert ivs[0].threshold == 0.25 and ivs[0].gate_layer == 1
    plain = _fit(gate=False).save(tmp_path / "b")
    assert not isinstance(RS.load_refusal_steering(plain)[0], RS.TopicGatedAdd)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ArtifactExists, match="--force"):
        _fit(gate=False).save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    _fit(gate=False).save(folder, force=True)
    assert RS.read_refusal_steering(folder).extra.get("gate") is None
    other = type("Other", (), {"spec": "big", "hidden_size": 8, "n_layers": 3})()
    with pytest.raises(ArtifactError, match="fitted on"):
        RS.load_refusal_steering(folder, other)
    (folder / "vector.safetensors").write_bytes(b"broken")
    with pytest.raises(ArtifactError, match="changed or damaged"):
        RS.load_refusal_steering(folder)
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        RS.load_refusal_steering(tmp_path / "missing")


def test_score_prompts_caches_through_cache_dir(tmp_path, monkeypatch):
    """Scores are computed once per key and read back (ids checked); cache_dir=None computes every time."""
    from crvlm_core.judges.base import JudgeResult

    calls = []

    def fake_sample(handle, prompts, k, *a, **kw):
        calls.append(len(prompts))
        return [[f"{p} answer {i}" for i in range(k)] for p in prompts]

    class FakeJudge:
        name, info = "fake", {}

        def judge(self, prompts, responses):
            return [JudgeResult(refused=i % 2 == 0, confidence=None) for i, _ in enumerate(responses)]

    monkeypatch.setattr(score_mod, "sample_responses", fake_sample)
    handle = type("H", (), {"key": "fake-model"})()
    samples = [Sample(f"s{i}", f"q{i}", "political") for i in range(3)]
    first = RS.score_prompts(handle, samples, FakeJudge(), k=2, cache_dir=tmp_path, progress=False)
    again = RS.score_prompts(handle, samples, FakeJudge(), k=2, cache_dir=tmp_path, progress=False)
    assert calls == [3] and [p.confidences for p in again] == [p.confidences for p in first] == [[1.0, -1.0]] * 3
    assert len(list(tmp_path.glob("refusal-steering-scores-*.json"))) == 1
    RS.score_prompts(handle, samples, FakeJudge(), k=2, cache_dir=None, progress=False)
    assert calls == [3, 3]


def test_study_metrics_keep_the_notebook_keys(tmp_path):
    cfg = RS.StudyConfig(model="m", methods=("rmd",), gated=())
    row = {"refusal_political": 0.1, "refusal_harmful": 0.9, "refusal_neutral": 0.0, "kl_neutral": float("nan"),
           "unchanged_neutral": 1.0}
    results = {"m": {"spec": "m", "unsteered": row, "_base_test": {}, "scored": {"n": 4},
                     "rmd": {**row, "layers": [3], "alpha": -1.0, "lambda_rel": 0.1, "lambda_table": {},
                             "alpha_search": [], "n_refuse": 2, "n_comply": 2}}}
    path = RS.write_study_metrics(tmp_path / "metrics.json", results, {"alpha": 1.0}, cfg)
    m = json.loads(path.read_text())
    assert {"refusal_rate_by_subject", "fits", "profile", "induction", "table", "judge"} <= set(m)
    assert m["refusal_rate_by_subject"]["m"]["rmd"] == {"political": 0.1, "harmful": 0.9, "neutral": 0.0}
    assert m["fits"]["m"]["rmd"]["layers"] == [3] and m["table"][1]["kl_neutral"] is None
    assert [r["condition"] for r in m["table"]] == ["unsteered", "rmd"]
