"""CR-VLM end to end on the real SmolLM2 (few samples, few epochs): fit, prefill gating, save/load, CLI round trip,
and the pipeline on a tiny LLaVA with images."""

import json

import pytest
import torch

from crvlm_core.core.artifacts import ArtifactError, ArtifactExists, read_manifest
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering, load_calibrated
from crvlm_core.methods.crvlm.config import BehaviouralConfig, CrvlmConfig
from crvlm_core.methods.crvlm.steering import fit_crvlm
from crvlm_core.methods.crvlm.train import CHECKPOINT_NAME
from crvlm_core.cli.main import main
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.models.loading import load_model
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.score import steered_logits


@pytest.fixture(scope="module")
def scoped():
    samples = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    return split(samples, n_train=6, n_test=2, seed=42)


@pytest.fixture(scope="module")
def fitted(smollm2, scoped, tmp_path_factory):
    train, _ = scoped
    out = tmp_path_factory.mktemp("crvlm")
    config = CrvlmConfig(layers=[10], gate_layer="auto", width=32, epochs=3, lr=1e-3)
    steering = fit_crvlm(smollm2, train, config, cache_dir=out / "cache", progress=False)
    assert not (out / "artifact").exists()
    steering.save(out / "artifact")
    return steering, out


def test_fit_crvlm_records_its_setup(fitted, smollm2):
    steering, out = fitted
    assert steering.layers == (10,) and steering.gate_layer == 27  # 90 % of 30 layers
    assert steering.vector is not None and steering.vector.method == "teacher-forced"
    log = out / "artifact" / "train_log.jsonl"
    assert log.exists() and len(log.read_text().splitlines()) == 3
    assert steering.info["n_in"] == 6 and steering.info["n_out"] == 6
    # the resume checkpoint went to the cache, keyed by the fit's inputs, not into the artifact folder
    assert len(list((out / "cache").glob(f"{CHECKPOINT_NAME}-*.pt"))) == 1
    assert not list((out / "artifact").rglob("*.pt"))


def test_artifact_is_one_verified_folder(fitted, smollm2, tmp_path):
    steering, out = fitted
    manifest = read_manifest(out / "artifact", kinds=("crvlm",))
    assert manifest["config"]["layers"] == [10] and manifest["config"]["gate_layer"] == 27
    assert manifest["config"]["fit"]["epochs"] == 3 and manifest["model"]["n_layers"] == smollm2.n_layers
    assert "refusal_vector/vector.safetensors" in manifest["files"]
    before = {p: p.read_bytes() for p in (out / "artifact").rglob("*") if p.is_file()}
    with pytest.raises(ArtifactExists):
        steering.save(out / "artifact")
    assert {p: p.read_bytes() for p in (out / "artifact").rglob("*") if p.is_file()} == before
    steering.save(out / "artifact", force=True, extra_json={"fit.json": {"method": "crvlm"}})
    loaded = load_calibrated(out / "artifact", smollm2)
    assert loaded.config == steering.config and loaded.history == steering.history
    copy = tmp_path / "copy"
    steering.save(copy)
    (copy / "refusal_vector" / "vector.safetensors").write_bytes(b"damaged")
    with pytest.raises(ArtifactError, match="changed or damaged"):
        load_calibrated(copy)
    with pytest.raises(ArtifactError, match="hidden size"):
        load_calibrated(out / "artifact", load_model("tiny-llava"))


def test_prefill_gate_fixes_rho_per_row(fitted, smollm2):
    steering, _ = fitted
    prompts = ["What is a cell?", "What is the derivative of x^2?"]
    enc = smollm2.build_inputs(prompts)
    auto = steered_logits(smollm2, enc, [steering])
    # the same rows with the gate values set by hand from the unsteered late-layer state
    from crvlm_core.extract import read_last_token

    rho = steering.calibrator.gate_values(read_last_token(smollm2, enc, [steering.gate_layer])[:, 0])
    manual = CalibratedSteering(steering.calibrator, steering.layers, None, gate_pass=steering.gate_pass)
    with steering.calibrator.gate_override(rho):
        by_hand = steered_logits(smollm2, enc, [manual])
    assert (auto - by_hand).abs().max() < 1e-4
    assert steering.calibrator._gate_override is None, "the override is released after the batch"
    # batches are prepared one at a time: batch_size 1 gives the same text as one batch of 2
    assert steered_generate(smollm2, prompts, [steering], max_new_tokens=5, batch_size=1) == \
        steered_generate(smollm2, prompts, [steering], max_new_tokens=5, batch_size=2)


def test_a_hard_gate_leaves_in_scope_rows_exactly_alone(fitted, smollm2, tmp_path):
    """#25 ``hard_gate``: the prefill gate's ρ rounded at 0.5 — a row gated in scope gets no update at all (the soft
    gate's ρ is never exactly 0, so it always leaks some), a row gated out gets the whole update; saved and loaded."""
    from crvlm_core.extract import read_last_token

    steering, _ = fitted
    prompts = ["What is a cell?", "What is the derivative of x^2?", "Name the capital of France.", "What is DNA?"]
    enc = smollm2.build_inputs(prompts)
    soft = steering.calibrator.gate_values(read_last_token(smollm2, enc, [steering.gate_layer])[:, 0])
    hard = CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, gate_pass=steering.gate_pass,
                              hard_gate=True)
    rounded = hard.gate_values(read_last_token(smollm2, enc, [steering.gate_layer])[:, 0])
    for layer, values in rounded.items():
        assert torch.equal(values, (soft[layer] > 0.5).to(values.dtype))
    plain = steered_logits(smollm2, enc)
    by_gate = steered_logits(smollm2, enc, [hard])
    manual = CalibratedSteering(steering.calibrator, steering.layers, None, gate_pass=steering.gate_pass)
    with steering.calibrator.gate_override(rounded):
        assert (by_gate - steered_logits(smollm2, enc, [manual])).abs().max() < 1e-4
    assert not torch.allclose(by_gate, steered_logits(smollm2, enc, [steering]), atol=1e-4), "ρ is not rounded"
    rows = rounded[steering.layers[0]]
    for k in range(len(prompts)):
        if rows[k] == 0:
            assert torch.equal(by_gate[k], plain[k])
    hard.save(tmp_path / "hard")
    assert load_calibrated(tmp_path / "hard").hard_gate and not load_calibrated(tmp_path / "hard").fixed_gate
    steering.save(tmp_path / "soft")
    meta = json.loads((tmp_path / "soft" / "crvlm.json").read_text())
    assert meta.pop("hard_gate") is False
    (tmp_path / "soft" / "crvlm.json").write_text(json.dumps(meta))  # an artifact from before the option
    assert not CalibratedSteering.read_files(tmp_path / "soft").hard_gate
    with pytest.raises(ValueError, match="gate layer"):
        CrvlmConfig(gate_layer=None, hard_gate=True)
    with pytest.raises(ValueError, match="gate_layer"):
        CalibratedSteering(steering.calibrator, steering.layers, None, hard_gate=True)


def test_an_in_scope_push_reverses_the_vector_only_where_the_gate_reads_in_scope(fitted, smollm2, tmp_path):
    """#25 ``in_scope_push``: rows a hard gate reads in scope get ``−β·v`` at the steered layer (from the last prompt
    token on, as the shared pass steers), rows gated out get exactly the hard gate's update; saved and loaded; older
    artifacts have none; bad values are refused."""
    from crvlm_core.extract import read_last_token
    from crvlm_core.steer.interventions import HiddenStateFn

    steering, _ = fitted
    prompts = ["What is a cell?", "What is the derivative of x^2?", "Name the capital of France.", "What is DNA?"]
    enc = smollm2.build_inputs(prompts)
    kw = dict(gate_pass=steering.gate_pass, hard_gate=True, vector=steering.vector)
    hard = CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, **kw)
    pushed = CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, in_scope_push=0.5, **kw)
    rows = hard.gate_values(read_last_token(smollm2, enc, [steering.gate_layer])[:, 0])[steering.layers[0]]
    assert 0 < rows.sum() < len(prompts), f"need rows gated both ways, got {rows.tolist()}"
    plain, by_hard, by_push = (steered_logits(smollm2, enc, ivs) for ivs in ([], [hard], [pushed]))
    layer, v = steering.layers[0], steering.vector.directions[steering.layers[0]]

    def by_hand(at, hidden):  # −0.5·v on the in-scope rows' last position
        out = hidden.clone()
        out[rows == 0, -1] -= 0.5 * v.to(hidden.dtype)
        return out

    manual = steered_logits(smollm2, enc, [HiddenStateFn(by_hand, (layer,))])
    for k in range(len(prompts)):
        if rows[k] == 1:
            assert torch.equal(by_push[k], by_hard[k])
        else:
            assert not torch.allclose(by_push[k, -1], plain[k, -1], atol=1e-3)
            assert (by_push[k, -1] - manual[k, -1]).abs().max() < 1e-3
            assert torch.equal(by_push[k, :-1], plain[k, :-1])
    original, calibrated, rho = pushed.calibrated_states(smollm2, fitted_samples(prompts), cache_dir=None)
    inn = rho[:, 0] == 0
    assert torch.allclose(calibrated[inn, 0], original[inn, 0] - 0.5 * v, atol=1e-5)
    pushed.save(tmp_path / "pushed")
    assert load_calibrated(tmp_path / "pushed").in_scope_push == 0.5
    meta = json.loads((tmp_path / "pushed" / "crvlm.json").read_text())
    meta.pop("in_scope_push")
    (tmp_path / "pushed" / "crvlm.json").write_text(json.dumps(meta))  # an artifact from before the option
    assert CalibratedSteering.read_files(tmp_path / "pushed").in_scope_push == 0.0
    assert CrvlmConfig(in_scope_push=0.5).in_scope_push == 0.5
    with pytest.raises(ValueError, match="gate layer"):
        CrvlmConfig(gate_layer=None, in_scope_push=0.5)
    with pytest.raises(ValueError, match="in_scope_push must be >= 0"):
        CrvlmConfig(in_scope_push=-1)
    with pytest.raises(ValueError, match="needs the vector"):
        CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, in_scope_push=0.5)


def fitted_samples(prompts):
    from crvlm_core.data.schema import Sample

    return [Sample(id=f"p{k}", prompt=p, subject="x") for k, p in enumerate(prompts)]


def test_a_gate_can_read_several_layers(smollm2, scoped, tmp_path):
    """#25 ``gate_extra_layers``: the prefill gate reads the last prompt token at the gate layer and at more layers,
    concatenated; the shared prompt pass and a pass of its own set the same gate; saved and loaded."""
    from crvlm_core.extract import read_last_token

    train, _ = scoped
    config = CrvlmConfig(layers=[10], gate_extra_layers=[10, 5], width=16, epochs=1, gate_fit="probe")
    assert config.gate_extra_layers == (5, 10) and CrvlmConfig(**config.to_dict()) == config
    steering = fit_crvlm(smollm2, train, config, progress=False)
    assert steering.gate_read_layers == (5, 10, 27) and steering.gate_extra_layers == (5, 10)
    assert steering.calibrator.config.d_gate == 3 * smollm2.hidden_size
    enc = smollm2.build_inputs(["What is a cell?", "Who wrote Hamlet?"])
    summary = read_last_token(smollm2, enc, [5, 10, 27]).flatten(1)
    assert torch.equal(steering.gate_summary(smollm2, enc), summary)
    separate = CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, gate_pass="shared",
                                  gate_extra_layers=(5, 10))
    shared_pass = steered_logits(smollm2, enc, [steering], last_only=True)  # the gates read in the one prompt pass
    own_pass = steered_logits(smollm2, enc, [separate])[:, -1:]  # full-sequence logits: the gate's own pass
    assert (shared_pass - own_pass).abs().max() < 1e-3
    only_22 = CalibratedSteering(steering.calibrator, steering.layers, steering.gate_layer, gate_pass="shared")
    with pytest.raises(Exception):  # the gate's weights are 3·d wide: one layer's summary does not fit
        steered_logits(smollm2, enc, [only_22], last_only=True)
    steering.save(tmp_path / "a")
    loaded = load_calibrated(tmp_path / "a", smollm2)
    assert loaded.gate_extra_layers == (5, 10) and loaded.config.gate_extra_layers == (5, 10)
    assert (steered_logits(smollm2, enc, [loaded], last_only=True) - shared_pass).abs().max() < 1e-5
    with pytest.raises(ValueError, match="gate layer"):
        CrvlmConfig(gate_layer=None, gate_extra_layers=[3])
    with pytest.raises(ValueError, match="gate_extra_layers"):
        CrvlmConfig(gate_extra_layers=[-1])


def test_save_and_load_round_trip(fitted, smollm2, tmp_path):
    steering, _ = fitted
    steering.save(tmp_path / "saved")
    loaded = load_calibrated(tmp_path / "saved")
    assert loaded.layers == steering.layers and loaded.gate_layer == steering.gate_layer
    assert torch.equal(loaded.vector.directions, steering.vector.directions)
    enc = smollm2.build_inputs(["What is a cell?"])
    assert (steered_logits(smollm2, enc, [loaded]) - steered_logits(smollm2, enc, [steering])).abs().max() < 1e-5
    qwen_sized = load_model("tiny-llava")
    with pytest.raises(ValueError, match="hidden size"):
        loaded.validate(qwen_sized)


def test_cli_fit_and_eval_crvlm(tmp_path, smollm2):
    art = tmp_path / "art"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--layers", "10",
              "--n-train", "3", "--epochs", "2", "--width", "16", "--out", str(art)])
    assert exc.value.code == 0
    fit = json.loads((art / "fit.json").read_text())
    assert fit["method"] == "crvlm" and fit["gate_layer"] == 27 and fit["layers"] == [10]
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--artifact", str(art), "--n-test", "1", "--max-new-tokens", "4", "--judge", "learned", "--out",
              str(tmp_path / "ev")])
    assert exc.value.code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["method"] == "crvlm" and metrics["n_in"] == 1 and metrics["n_out"] == 1


def test_pipeline_runs_on_a_tiny_llava_with_images():
    h = load_model("tiny-llava")
    mm = assign_scope(load_dataset("mm_subjects"), in_scope=["biology"])
    train, test = split(mm, n_train=4, n_test=2, seed=0)
    steering = fit_crvlm(h, train, CrvlmConfig(layers=[1], gate_layer=None, width=16, epochs=2, lr=1e-3), progress=False)
    images = [s.load_image() for s in test]
    out = steered_generate(h, [s.prompt for s in test], [steering], images=images, max_new_tokens=3)
    assert len(out) == len(test)


def test_behavioural_finetune_trains_only_the_calibrator(smollm2, scoped):
    from crvlm_core.methods.crvlm.behavioural import finetune_behavioural

    train, _ = scoped
    few = [s for s in train if s.scope == "out"][:2] + [s for s in train if s.scope == "in"][:2]
    steering = fit_crvlm(smollm2, few, CrvlmConfig(layers=[10], gate_layer=None, width=16, epochs=1), progress=False)
    model_before = {k: v.clone() for k, v in smollm2.hf_model.state_dict().items() if "layers.10." in k}
    cal_before = {k: v.clone() for k, v in steering.calibrator.state_dict().items()}
    history = finetune_behavioural(steering, smollm2, few, BehaviouralConfig(epochs=4, lr=1e-3, batch_size=2),
                                   progress=False)
    assert len(history) == 4 and all(torch.isfinite(torch.tensor([h["ce_out"], h["kl_in"]])).all() for h in history)
    assert history[-1]["ce_out"] < history[0]["ce_out"], "the refusal becomes more likely out of scope"
    assert any(not torch.equal(v, steering.calibrator.state_dict()[k]) for k, v in cal_before.items())
    assert all(torch.equal(v, smollm2.hf_model.state_dict()[k]) for k, v in model_before.items())
    assert not any(p.requires_grad for p in smollm2.hf_model.parameters())


def test_framing_augmentation_adds_framed_copies_to_the_calibrators_training(smollm2, scoped, tmp_path):
    """#25: ``framing_augment=1`` trains on every question twice, once dressed with a training template; the
    refusal vector still comes from the plain questions."""
    from crvlm_core.methods.refusal_vectors import VectorConfig, fit_vector

    train, _ = scoped
    vector = fit_vector(smollm2, train, VectorConfig("teacher-forced", layers=[10]), progress=False)
    base = CrvlmConfig(layers=[10], gate_layer="auto", width=16, epochs=1)
    plain = fit_crvlm(smollm2, train, base, vector, progress=False)
    framed = fit_crvlm(smollm2, train, CrvlmConfig(**{**base.to_dict(), "framing_augment": 1}), vector,
                       progress=False)
    assert (framed.info["n_in"], framed.info["n_out"]) == (2 * plain.info["n_in"], 2 * plain.info["n_out"])
    assert framed.config.framing_augment == 1 and plain.config.framing_augment == 0
    with pytest.raises(Exception, match="framing_augment"):
        CrvlmConfig(framing_augment=-1)


def test_a_probe_gate_stays_as_fitted_through_the_behavioural_stage(smollm2, scoped):
    """#25: with ``gate_fit="probe"`` the behavioural stage trains the flow network and leaves the gate alone."""
    from crvlm_core.methods.crvlm.behavioural import finetune_behavioural

    train, _ = scoped
    few = [s for s in train if s.scope == "out"][:2] + [s for s in train if s.scope == "in"][:2]
    steering = fit_crvlm(smollm2, few, CrvlmConfig(layers=[10], gate_fit="probe", width=16, epochs=1),
                         progress=False)
    before = {k: v.clone() for k, v in steering.calibrator.state_dict().items()}
    finetune_behavioural(steering, smollm2, few, BehaviouralConfig(epochs=2, lr=1e-3, batch_size=2), progress=False)
    after = steering.calibrator.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if ".gate." in k)
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if ".flow." in k)


def test_the_behavioural_stage_sees_a_seeded_subset_of_each_scope_at_most(smollm2, scoped):
    """``BehaviouralConfig.max_per_scope``: the stage's cost grows with its data; a cap keeps it bounded."""
    from crvlm_core.methods.crvlm.behavioural import _subset, finetune_behavioural

    train, _ = scoped
    few = [s for s in train if s.scope == "out"][:3] + [s for s in train if s.scope == "in"][:2]
    steering = fit_crvlm(smollm2, few, CrvlmConfig(layers=[10], gate_layer=None, width=16, epochs=1), progress=False)
    history = finetune_behavioural(steering, smollm2, few, BehaviouralConfig(epochs=1, batch_size=1, max_per_scope=1),
                                   progress=False)
    info = steering.info["behavioural"]
    assert (info["n_in"], info["n_out"]) == (1, 1) and len(history) == 1
    rows = list(range(10))
    assert _subset(rows, 4, 0) == _subset(rows, 4, 0) != _subset(rows, 4, 1) and len(_subset(rows, 4, 0)) == 4
    assert _subset(rows, 4, 0) == sorted(_subset(rows, 4, 0)) and _subset(rows, None, 0) == rows == _subset(rows, 10, 0)
    with pytest.raises(Exception, match="max_per_scope"):
        BehaviouralConfig(max_per_scope=0)
