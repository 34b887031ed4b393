"""The vision loss (CR-VLM eq. 10–12) in the real pipeline: counterfactual shifts that swap only the image, fed to
the calibrator by fit_crvlm on a VLM with image data, absent on a text-only model."""

import json

import pytest
import torch

from crvlm_core.methods.crvlm.config import CrvlmConfig
from crvlm_core.methods.crvlm.steering import fit_crvlm, vision_counterfactual_shifts
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.data.bundled import load_dataset
from crvlm_core.models.loading import load_model
from crvlm_core.steer.generate import steered_generate


@pytest.fixture(scope="module")
def tiny_llava():
    return load_model("tiny-llava")


@pytest.fixture(scope="module")
def mm():
    return split(assign_scope(load_dataset("mm_subjects"), in_scope=["biology"]), n_train=6, n_test=2, seed=0)


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("gate_layer", [None, "auto"])
def test_vision_term_is_active_and_decreases_on_tiny_llava(tiny_llava, mm, tmp_path, gate_layer):
    train, _ = mm
    config = CrvlmConfig(layers=[1], gate_layer=gate_layer, width=32, epochs=30, lr=1e-3, batch_size=8)
    steering = fit_crvlm(tiny_llava, train, config, log_path=tmp_path / "train_log.jsonl", progress=False)
    vis = steering.info["vision_loss"]
    n_out = sum(s.scope == "out" for s in train)
    assert vis["active"] and vis["n_image_samples"] == n_out
    # train_positions="tokens": every token state of an image sample carries its sample's shift
    assert vis["n_image_rows"] == steering.info["n_train_states"][1]
    log = _log(tmp_path)
    assert len(log) == 30 and all("loss_vision" in entry for entry in log)
    assert log[-1]["loss_vision"] < log[0]["loss_vision"]
    assert vis["final"] == pytest.approx(log[-1]["loss_vision"])


def test_vision_term_with_last_positions(tiny_llava, mm, tmp_path):
    train, _ = mm
    config = CrvlmConfig(layers=[0, 1], gate_layer=None, width=16, epochs=2, lr=1e-3, train_positions="last")
    steering = fit_crvlm(tiny_llava, train, config, log_path=tmp_path / "train_log.jsonl", progress=False)
    vis = steering.info["vision_loss"]
    assert vis["active"] and vis["n_image_rows"] == steering.info["n_out"]
    assert all("loss_vision" in entry for entry in _log(tmp_path))
    # w_vision = 0 switches it off
    off = fit_crvlm(tiny_llava, train, CrvlmConfig(layers=[1], gate_layer=None, width=16, epochs=1, w_vision=0.0),
                    progress=False)
    assert off.info["vision_loss"] == {"active": False}
    assert "loss_vision" not in off.info["final_losses"]


def test_counterfactual_shifts_swap_only_the_image(tiny_llava, mm):
    train, _ = mm
    out = [s for s in train if s.scope == "out"]
    inn = [s for s in train if s.scope == "in"]
    assert len({s.image for s in inn}) >= 2
    layers = [0, 1]
    shifts, mask, paired = vision_counterfactual_shifts(tiny_llava, out, inn, layers, progress=False)
    assert shifts.shape == (len(out), len(layers), tiny_llava.hidden_size)
    assert torch.isfinite(shifts).all() and mask.all() and (shifts.norm(dim=-1) > 0).all()
    assert set(paired) <= {s.id for s in inn}
    # cycling: more out-of-scope samples than in-scope images still pairs every row
    few, _, paired_few = vision_counterfactual_shifts(tiny_llava, out, inn[:2], layers, progress=False)
    assert set(paired_few) == {inn[0].id, inn[1].id}
    # another paired in-scope image changes the shift
    a, _, pa = vision_counterfactual_shifts(tiny_llava, out, [inn[0]], layers, progress=False)
    b, _, pb = vision_counterfactual_shifts(tiny_llava, out, [inn[1]], layers, progress=False)
    assert inn[0].image != inn[1].image and set(pa) == {inn[0].id} and set(pb) == {inn[1].id}
    assert not torch.allclose(a, b)
    # seeded: the same call gives the same pairs and shifts
    again, _, paired_again = vision_counterfactual_shifts(tiny_llava, out, inn, layers, progress=False)
    assert paired_again == paired and torch.equal(again, shifts)
    # samples without an image get no shift
    from dataclasses import replace

    mixed = [replace(out[0], image=None)] + out[1:]
    m_shifts, m_mask, m_paired = vision_counterfactual_shifts(tiny_llava, mixed, inn, layers, progress=False)
    assert not m_mask[0] and m_mask[1:].all() and m_paired[0] is None and (m_shifts[0] == 0).all()


def test_text_only_model_has_no_vision_term(smollm2):
    train, _ = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=4, n_test=1, seed=42)
    steering = fit_crvlm(smollm2, train, CrvlmConfig(layers=[10], gate_layer=None, width=16, epochs=1), progress=False)
    assert steering.info["vision_loss"] == {"active": False}
    assert "loss_vision" not in steering.info["final_losses"]
    shifts, mask, _ = vision_counterfactual_shifts(smollm2, [s for s in train if s.scope == "out"],
                                                   [s for s in train if s.scope == "in"], [10], progress=False)
    assert not mask.any() and (shifts == 0).all()


@pytest.mark.parametrize("spec", ["llava-smollm2", pytest.param("llava-qwen2.5-0.5b", marks=pytest.mark.slow)])
def test_llava_around_a_real_lm_with_images_end_to_end(spec, tmp_path):
    """The whole CR-VLM path (teacher-forced vector, vision counterfactual shifts, calibrator training with the vision
    term, save / load, calibrated generation with images) on a LLaVA wrapping a real language model."""
    from crvlm_core.methods.crvlm.calibrated import load_calibrated

    h = load_model(spec)
    train, test = split(assign_scope(load_dataset("mm_subjects"), in_scope=["biology"]), n_train=3, n_test=1, seed=0)
    layer = h.n_layers // 3
    steering = fit_crvlm(h, train, CrvlmConfig(layers=[layer], gate_layer="auto", width=16, epochs=2, lr=1e-3),
                         progress=False)
    assert steering.info["vision_loss"]["active"]
    assert steering.info["vision_loss"]["n_image_samples"] == sum(s.scope == "out" for s in train)
    steering.save(tmp_path / "artifact")
    steering = load_calibrated(tmp_path / "artifact", h)
    steering.validate(h)
    texts = steered_generate(h, [s.prompt for s in test], [steering], images=[s.load_image() for s in test],
                             max_new_tokens=4)
    assert len(texts) == len(test) and all(isinstance(t, str) and t.strip() for t in texts)


def test_scope_probe_reads_the_scope_from_the_picture_alone(tiny_llava, tmp_path):
    """On pictures whose scope is a function of the picture (and the same question text), the probe beats chance on
    held-out pictures; with the scopes shuffled it cannot (the probe can fail)."""
    from dataclasses import replace

    from PIL import Image

    from crvlm_core.data.schema import Sample
    from crvlm_core.vision_ablation import scope_probe

    def pictures(tmp, n, offset):
        out = []
        for i in range(n):
            colour = (250, 30, 30) if i % 2 else (30, 30, 250)  # red in scope, blue out
            path = tmp / f"p{offset + i}.png"
            Image.new("RGB", (32, 32), tuple(min(255, c + 3 * i) for c in colour)).save(path)
            out.append(Sample(id=f"p{offset + i}", prompt="What is shown in this picture?", subject="x",
                              scope="in" if i % 2 else "out", image=path))
        return out

    train, test = pictures(tmp_path, 16, 0), pictures(tmp_path, 8, 100)
    got = scope_probe(tiny_llava, train, test, layers=[1])
    assert set(got) == {1} and got[1]["n_train"] == 16 and got[1]["n_test"] == 8
    assert got[1]["auc"] > 0.9
    shuffled = [replace(s, scope="in" if k in (0, 3, 5, 6, 9, 10, 12, 15) else "out") for k, s in enumerate(train)]
    assert scope_probe(tiny_llava, shuffled, test, layers=[1])[1]["auc"] < 0.9
