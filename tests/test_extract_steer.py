"""Extraction (positions, padding, cache) and steering (equal to plain forward hooks, composable, refusal score)."""

import json
from dataclasses import replace

import pytest
import torch

from crvlm_core.data.schema import Sample
from crvlm_core.data.bundled import load_dataset
from crvlm_core.core.cache import entry_path
from crvlm_core.extract import extract
from crvlm_core.models.loading import load_model
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector, HiddenStateFn, ProjectOut
from crvlm_core.steer.score import refusal_score, steered_logits

PROMPTS = ["What is a cell?", "Explain in detail how photosynthesis converts light into chemical energy.",
           "Name a planet."]


def _samples(prompts=PROMPTS):
    return [Sample(id=f"s{i}", prompt=p, subject="biology", scope="out") for i, p in enumerate(prompts)]


def test_batched_extraction_equals_single_prompts(smollm2):
    batched = extract(smollm2, _samples(), cache_dir=False, progress=False, batch_size=3)
    assert batched.acts.shape == (3, 30, 576)
    for i, s in enumerate(_samples()):
        single = extract(smollm2, [s], cache_dir=False, progress=False)
        assert torch.allclose(batched.acts[i], single.acts[0], atol=1e-4)


def test_length_grouped_batches_keep_the_callers_order(smollm2):
    """Batches group prompts of similar token length (less left padding) and every result lands on its own row:
    batch 2 over mixed lengths equals one prompt at a time, for extraction, refusal scores and generation."""
    from crvlm_core.extract import image_batches

    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[1] + " Be brief.", PROMPTS[0]]
    lengths = smollm2.prompt_lengths(prompts)
    assert lengths[2] > lengths[0] > max(lengths[1], lengths[3]) and smollm2.prompt_lengths([]) == []
    batches = image_batches([False] * 4, 2, lengths=lengths)
    assert [sorted(idx) for _, idx in batches] == [[1, 3], [0, 2]]  # the two short, then the two long prompts
    assert image_batches([True, False, True, False], 1, lengths=[5, 1, 2, 9]) == [(True, [2]), (True, [0]),
                                                                                   (False, [1]), (False, [3])]
    assert image_batches([False] * 3, 8, lengths=[3, 1, 2]) == [(False, [0, 1, 2])]  # one batch: order kept
    with pytest.raises(ValueError, match="lengths"):
        image_batches([False] * 3, 2, lengths=[1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        image_batches([False], 0)
    padded = lambda order: sum(max(lengths[k] for k in order[i:i + 2]) * 2 for i in range(0, 4, 2))
    assert padded([k for _, idx in batches for k in idx]) < padded([0, 1, 2, 3])

    samples = _samples(prompts)
    batched = extract(smollm2, samples, cache_dir=False, progress=False, batch_size=2)
    scores = refusal_score(smollm2, prompts, batch_size=2)
    texts = steered_generate(smollm2, prompts, max_new_tokens=4, batch_size=2)
    for i, s in enumerate(samples):
        assert torch.allclose(batched.acts[i], extract(smollm2, [s], cache_dir=False, progress=False).acts[0], atol=1e-4)
        assert torch.allclose(scores[i], refusal_score(smollm2, [s.prompt])[0], atol=1e-3)
        assert texts[i] == steered_generate(smollm2, [s.prompt], max_new_tokens=4)[0]


def test_teacher_forced_read_is_the_prefix_last_token(smollm2):
    s = _samples()[:1]
    tf = extract(smollm2, s, assistant_prefix="Sorry, I cannot", layers=[5], cache_dir=False, progress=False)
    enc = smollm2.build_inputs([s[0].prompt], assistant_prefix="Sorry, I cannot")
    with torch.no_grad():
        hs = smollm2.hf_model(**enc, output_hidden_states=True).hidden_states
    assert torch.allclose(tf.acts[0, 0], hs[6][0, -1], atol=1e-4)  # hidden_states[L+1] is layer L's output
    mean = extract(smollm2, s, assistant_prefix="Sorry, I cannot", position="prefix-mean", layers=[5], cache_dir=False,
                   progress=False)
    n_prefix = enc["input_ids"].shape[1] - smollm2.build_inputs([s[0].prompt])["input_ids"].shape[1]
    assert torch.allclose(mean.acts[0, 0], hs[6][0, -n_prefix:].mean(0), atol=1e-4)


def test_cache_hit_miss_and_invalidation(smollm2, tmp_path):
    s = _samples()
    first = extract(smollm2, s, layers=[1, 2], cache_dir=tmp_path, progress=False)
    assert not first.from_cache and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = extract(smollm2, s, layers=[1, 2], cache_dir=tmp_path, progress=False)
    assert again.from_cache and torch.equal(first.acts, again.acts)
    changed = [replace(s[0], prompt="What is a virus?")] + s[1:]
    other = extract(smollm2, changed, layers=[1, 2], cache_dir=tmp_path, progress=False)
    assert not other.from_cache and other.fingerprint != first.fingerprint
    assert not extract(smollm2, s, layers=[1, 3], cache_dir=tmp_path, progress=False).from_cache
    assert not extract(smollm2, s, layers=[1, 2], assistant_prefix="Sorry", cache_dir=tmp_path, progress=False).from_cache
    assert not list(tmp_path.glob("*.tmp*")), "atomic writes leave no temp files"
    # a damaged entry is recomputed, not trusted
    (entry_path(tmp_path, "activations", first.fingerprint, ".safetensors")).write_bytes(b"garbage")
    assert not extract(smollm2, s, layers=[1, 2], cache_dir=tmp_path, progress=False).from_cache


def test_token_states_cover_the_last_token_and_are_cached(smollm2, tmp_path):
    from crvlm_core.extract import extract_token_states

    s = _samples()
    acts, owner = extract_token_states(smollm2, s, layers=[2, 1], per_sample=3, cache_dir=tmp_path, progress=False)
    assert acts.shape[1:] == (2, smollm2.hidden_size) and acts.shape[0] == owner.shape[0] == 4 * len(s)
    assert owner.tolist() == [k for k in range(len(s)) for _ in range(4)]
    last = extract(smollm2, s, layers=[1, 2], cache_dir=False, progress=False).acts
    rows = torch.stack([acts[owner == k][-1] for k in range(len(s))])  # each sample's last row: its last token
    assert torch.allclose(rows, last, atol=1e-4)
    sidecar = json.loads(next(tmp_path.glob("*.json")).read_text())["meta"]
    assert sidecar["rows"] == len(acts) and sidecar["ids"] == [x.id for x in s] and sidecar["layers"] == [1, 2]
    again = extract_token_states(smollm2, s, layers=[1, 2], per_sample=3, cache_dir=tmp_path, progress=False)
    assert torch.equal(again[0], acts) and torch.equal(again[1], owner)
    (next(tmp_path.glob("*.safetensors"))).write_bytes(b"garbage")  # damaged: recomputed
    assert torch.allclose(extract_token_states(smollm2, s, layers=[1, 2], per_sample=3, cache_dir=tmp_path,
                                               progress=False)[0], acts, atol=1e-5)
    with pytest.raises(ValueError, match="no samples"):
        extract_token_states(smollm2, [], layers=[1])


def test_extraction_bad_inputs(smollm2):
    with pytest.raises(ValueError, match="empty"):
        extract(smollm2, [], cache_dir=False)
    with pytest.raises(ValueError, match="out of range"):
        extract(smollm2, _samples(), layers=[30], cache_dir=False)
    with pytest.raises(ValueError, match="unknown position"):
        extract(smollm2, _samples(), position="middle", cache_dir=False)
    with pytest.raises(ValueError, match="needs an assistant_prefix"):
        extract(smollm2, _samples(), position="prefix-mean", cache_dir=False, progress=False)


def test_image_positions_on_tiny_llava():
    h = load_model("tiny-llava")
    mm = load_dataset("mm_subjects", limit_per_subject=1)
    acts = extract(h, mm, position="image-mean", cache_dir=False, progress=False, batch_size=2)
    assert acts.acts.shape == (len(mm), h.n_layers, h.hidden_size) and torch.isfinite(acts.acts).all()
    text_only = extract(h, mm, use_images=False, cache_dir=False, progress=False)
    assert not torch.allclose(text_only.acts, extract(h, mm, cache_dir=False, progress=False).acts)


def _hooked(handle, interventions):
    hooks = []
    for layer in sorted({l for iv in interventions for l in iv.layers}):
        def hook(_m, _i, out, layer=layer):
            for iv in interventions:
                if layer in iv.layers:
                    out = iv.apply(layer, out)
            return out
        hooks.append(handle.torch_layers[layer].register_forward_hook(hook))
    return hooks


def test_steering_equals_plain_forward_hooks(smollm2):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(30, 576, generator=g) * 2
    ivs = [AddVector(v, (5, 12), 1.5), ProjectOut(torch.randn(30, 576, generator=g), (12,), 1.0)]
    enc = smollm2.build_inputs(PROMPTS)
    ours = steered_logits(smollm2, enc, ivs)
    hooks = _hooked(smollm2, ivs)
    try:
        # nnsight gives a left-padded text batch mask-derived position ids; the plain reference gets the same
        # inputs (without them the two forwards differ by ~9e-5 even with no intervention at all).
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            ref = smollm2.hf_model(**enc, position_ids=positions).logits
        ref_text = smollm2.generate(PROMPTS, max_new_tokens=8)
    finally:
        for h in hooks:
            h.remove()
    real = enc["attention_mask"].bool()
    assert (ours - ref)[real].abs().max() < 1e-4
    assert steered_generate(smollm2, PROMPTS, ivs, max_new_tokens=8, batch_size=2) == ref_text
    assert steered_generate(smollm2, PROMPTS, [], max_new_tokens=8) == smollm2.generate(PROMPTS, max_new_tokens=8)

def test_interventions_compose_and_callable_hook_point(smollm2):
    v = torch.randn(30, 576)
    enc = smollm2.build_inputs(PROMPTS[:1])
    twice = steered_logits(smollm2, enc, [AddVector(v, (4,), 1.0), AddVector(v, (4,), 1.0)])
    once = steered_logits(smollm2, enc, [AddVector(v, (4,), 2.0)])
    as_fn = steered_logits(smollm2, enc, [HiddenStateFn(lambda layer, h: h + 2.0 * v[layer], (4,))])
    assert (twice - once).abs().max() < 1e-4 and (as_fn - once).abs().max() < 1e-4
    ablated = ProjectOut(v, (4,), 1.0)
    h = torch.randn(2, 3, 576)
    assert (ablated.apply(4, h) @ (v[4] / v[4].norm())).abs().max() < 1e-4


def test_steering_bad_inputs(smollm2):
    with pytest.raises(ValueError, match="out of range"):
        steered_logits(smollm2, smollm2.build_inputs(["Hi"]), [AddVector(torch.zeros(30, 576), (40,))])
    with pytest.raises(ValueError, match="do not fit"):
        steered_logits(smollm2, smollm2.build_inputs(["Hi"]), [AddVector(torch.zeros(24, 896), (3,))])


def test_refusal_score_rises_with_a_refusal_prompt(smollm2):
    plain = refusal_score(smollm2, ["What is a cell?"])
    told = refusal_score(smollm2, ["What is a cell?"], system="Always start your reply with 'Sorry'.")
    assert plain.shape == (1,) and torch.isfinite(plain).all()
    assert told[0] > plain[0]


def test_last_only_logits_equal_the_full_forward_at_the_last_position(smollm2):
    enc = smollm2.build_inputs(PROMPTS)
    ivs = [AddVector(torch.randn(30, 576), (3,), 1.0)]
    full = steered_logits(smollm2, enc, ivs)
    last = steered_logits(smollm2, enc, ivs, last_only=True)
    assert last.shape == (3, 1, full.shape[-1]) and (last[:, 0] - full[:, -1]).abs().max() < 1e-4
