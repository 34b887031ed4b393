"""One prompt pass for prefill gates (issue #23): ``gate_pass="shared"`` reads the gate in the unsteered prompt pass
whose cache the steered generation continues from. Same tokens as plain generation where nothing is steered, the
same tokens and logits as the nnsight backend (which reads the gate in a pass of its own and steers the same
positions), one prompt-length forward per batch instead of two, and the setting saved with the artifacts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from crvlm_core.methods.crvlm.calibrated import CalibratedSteering, load_calibrated
from crvlm_core.methods.crvlm.config import CalibratorConfig
from crvlm_core.methods.crvlm.module import Calibrator
from crvlm_core.steer.apply import validated
from crvlm_core.steer.base import PrefillGate
from crvlm_core.steer.generate import generate_batch, steered_generate
from crvlm_core.steer.score import refusal_score, steered_logits

PROMPTS = ["What is a ribosome?", "Name a prime number larger than ten, please, and say why it is prime.", "Hi"]


def random_calibrator(handle, layers, gate_layer, gate_pass="shared", scale=1.0, seed=0):
    torch.manual_seed(seed)
    cfg = CalibratorConfig(hidden_size=handle.hidden_size, layers=list(layers), width=32, gate_dim=handle.hidden_size)
    cal = Calibrator(cfg)
    with torch.no_grad():
        for p in cal.parameters():
            p.add_(torch.randn_like(p) * scale)
    return CalibratedSteering(cal, tuple(layers), gate_layer=gate_layer, gate_pass=gate_pass)


class Identity(PrefillGate):
    """A shared prefill gate that steers nothing: the generation must equal plain generation."""

    def __init__(self, layers, gate_layer):
        self.layers, self.gate_layer, self.gate_pass, self.seen = tuple(layers), gate_layer, "shared", []

    def set_gate(self, summary):
        self.seen.append(summary.shape)

    def clear_gate(self):
        pass

    def steer(self, layer, hidden):
        return hidden


def images(n):
    return [Image.fromarray((np.random.RandomState(i).rand(48, 48, 3) * 255).astype("uint8")) for i in range(n)]


@pytest.mark.parametrize("spec", ["smollm2-135m", "tiny-llava", "tiny-qwen2-vl", "tiny-idefics3", "tiny-instructblip"])
def test_shared_pass_continues_exactly_where_plain_generation_would(spec):
    from crvlm_core.models.loading import load_model

    handle = load_model(spec, device="cpu")
    imgs = None if spec == "smollm2-135m" else images(len(PROMPTS))
    enc = handle.build_inputs(PROMPTS, imgs)
    gate = Identity((1,), handle.n_layers - 1)
    ids = generate_batch(handle, enc, validated(handle, [gate]), 8)
    plain = handle.hf_model.generate(**enc, max_new_tokens=8, do_sample=False,
                                     pad_token_id=handle.tokenizer.pad_token_id).cpu()
    assert torch.equal(ids, plain)
    assert gate.seen == [torch.Size([len(PROMPTS), handle.hidden_size])]  # read once, in the shared pass


def test_shared_gate_gives_the_same_tokens_through_both_backends(smollm2):
    steer = random_calibrator(smollm2, (4,), smollm2.n_layers - 2, scale=0.5)
    hooks = steered_generate(smollm2, PROMPTS, [steer], max_new_tokens=10, backend="hooks")
    nnsight = steered_generate(smollm2, PROMPTS, [steer], max_new_tokens=10, backend="nnsight")
    plain = steered_generate(smollm2, PROMPTS, [], max_new_tokens=10)
    assert hooks == nnsight
    assert hooks != plain  # the calibrator changed something
    assert steer.calibrator._gate_override is None  # released


def test_shared_and_separate_differ_only_in_the_prompt_positions_they_steer(smollm2):
    shared = random_calibrator(smollm2, (4,), smollm2.n_layers - 2, scale=0.5)
    separate = random_calibrator(smollm2, (4,), smollm2.n_layers - 2, gate_pass="separate", scale=0.5)
    enc = smollm2.build_inputs(PROMPTS)
    full_shared = steered_logits(smollm2, enc, [shared])  # the nnsight trace: the prompt's last token steered
    full_separate = steered_logits(smollm2, enc, [separate])  # every prompt token steered
    plain = steered_logits(smollm2, enc, [])
    # before the last position the shared gate leaves the prompt as it is; the separate one changes it
    assert torch.allclose(full_shared[:, :-1], plain[:, :-1], atol=1e-4)
    assert not torch.allclose(full_separate[:, :-1], plain[:, :-1], atol=1e-2)
    # the one-pass logits (cache + the last token again, steered) equal the trace's last position
    fast = steered_logits(smollm2, enc, [shared], last_only=True)
    assert torch.allclose(fast[:, -1], full_shared[:, -1], atol=2e-3)
    scores = refusal_score(smollm2, PROMPTS, [shared])
    assert torch.isfinite(scores).all()


def test_a_shared_gate_costs_one_prompt_pass(smollm2):
    """Count the decoder's forwards over the whole prompt: two with a separate gate pass, one with the shared pass."""
    calls = []
    hook = smollm2.torch_layers[0].register_forward_hook(lambda _m, i, _o: calls.append(i[0].shape[1]))
    try:
        counts = {}
        for mode in ("separate", "shared"):
            calls.clear()
            steer = random_calibrator(smollm2, (4,), smollm2.n_layers - 2, gate_pass=mode, scale=0.5)
            steered_generate(smollm2, PROMPTS, [steer], max_new_tokens=4, batch_size=len(PROMPTS))
            counts[mode] = sum(n > 1 for n in calls)
    finally:
        hook.remove()
    assert counts == {"separate": 2, "shared": 1}


def test_gate_pass_is_saved_and_older_artifacts_read_as_separate(smollm2, tmp_path):
    steer = random_calibrator(smollm2, (4,), smollm2.n_layers - 2)
    steer.save(tmp_path / "a")
    assert load_calibrated(tmp_path / "a", smollm2).gate_pass == "shared"
    manifest = json.loads((tmp_path / "a" / "artifact.json").read_text())
    assert manifest["config"]["gate_pass"] == "shared"
    # the files of an artifact written before the setting existed: crvlm.json without gate_pass
    meta = json.loads((tmp_path / "a" / "crvlm.json").read_text())
    meta.pop("gate_pass")
    (tmp_path / "a" / "crvlm.json").write_text(json.dumps(meta))
    assert CalibratedSteering.read_files(tmp_path / "a").gate_pass == "separate"


def test_cast_reads_its_condition_in_the_shared_pass(smollm2):
    from crvlm_core.methods.baselines.cast import ConditionalSteering

    torch.manual_seed(1)
    d = smollm2.hidden_size
    vectors = torch.randn(smollm2.n_layers, d) * 4
    kw = dict(condition=torch.randn(d), center=torch.zeros(d), gate_layer=smollm2.n_layers - 2, threshold=-1.0)
    shared = ConditionalSteering(vectors, (4,), 1.0, gate_pass="shared", **kw)
    hooks = steered_generate(smollm2, PROMPTS, [shared], max_new_tokens=8, backend="hooks")
    nnsight = steered_generate(smollm2, PROMPTS, [shared], max_new_tokens=8, backend="nnsight")
    assert hooks == nnsight
    assert hooks != steered_generate(smollm2, PROMPTS, [], max_new_tokens=8)
    with pytest.raises(ValueError, match="gate_pass"):
        ConditionalSteering(vectors, (4,), 1.0, gate_pass="twice", **kw).validate(smollm2)


def test_logits_callback_sees_only_the_steered_steps(smollm2):
    """The server's per-step logits (``on_logits``): one call per generated token, the first one the steered last
    prompt token's, never the unsteered logits of the shared pass."""
    steer = random_calibrator(smollm2, (4,), smollm2.n_layers - 2, scale=0.5)
    enc = smollm2.build_inputs(PROMPTS)
    seen = []
    ids = generate_batch(smollm2, enc, validated(smollm2, [steer]), 4, on_logits=lambda x: seen.append(x.clone()))
    assert len(seen) == ids.shape[1] - enc["input_ids"].shape[1]
    first = steered_logits(smollm2, enc, [steer], last_only=True)[:, -1]
    assert torch.allclose(seen[0], first, atol=1e-4)
    assert torch.equal(seen[0].argmax(-1), ids[:, enc["input_ids"].shape[1]])
