"""load_model: the real embedded models, local folders, hub ids offline, uniform layer access, batched inputs."""

import nnsight
import pytest
import torch

from crvlm_core.core.errors import InputError
from crvlm_core.models import embedded, loading, specs
from crvlm_core.models.loading import load_model
from crvlm_core.models.specs import ModelLoadError

BIO = "What is the function of mitochondria in a cell?"


def _last_token_states(handle, prompts):
    enc = handle.build_inputs(prompts)
    with torch.no_grad(), handle.model.trace(enc):
        acts = nnsight.save([handle.layers[i].output[:, -1, :] for i in range(handle.n_layers)])
    return torch.stack([a.detach().cpu() for a in acts], dim=1)  # [batch, layers, d]


def test_smollm2_loads_forward_and_generates(smollm2):
    assert smollm2.family == "causal" and smollm2.n_layers == 30 and smollm2.hidden_size == 576
    assert 130e6 < smollm2.n_params < 140e6
    enc = smollm2.build_inputs([BIO, "Name a planet."])
    assert enc["input_ids"].shape[0] == 2
    assert (enc["attention_mask"][:, -1] == 1).all(), "left padding: the last position is real for every row"
    with torch.no_grad():
        logits = smollm2.hf_model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    answers = smollm2.generate([BIO, "Name a planet."], max_new_tokens=12)
    assert len(answers) == 2 and all(len(a) > 5 for a in answers)
    assert "energy" in answers[0].lower() or "atp" in answers[0].lower() or "power" in answers[0].lower()


def test_layer_outputs_have_residual_shape(smollm2):
    enc = smollm2.build_inputs([BIO, "Hi"])
    seq = enc["input_ids"].shape[1]
    with torch.no_grad(), smollm2.model.trace(enc):
        first = smollm2.layers[0].output.save()
        last = smollm2.layers[-1].output.save()
    assert tuple(first.shape) == (2, seq, 576) and tuple(last.shape) == (2, seq, 576)


def test_left_padded_batch_equals_single_prompts(smollm2):
    prompts = [BIO, "Hi", "Explain in detail how photosynthesis converts light into chemical energy in plants."]
    batched = _last_token_states(smollm2, prompts)
    for i, p in enumerate(prompts):
        single = _last_token_states(smollm2, [p])[0]
        assert torch.allclose(batched[i], single, atol=1e-4), (i, (batched[i] - single).abs().max())


def test_default_model_is_the_safety_tuned_qwen(qwen):
    assert specs.DEFAULT_MODEL == "qwen2.5-0.5b"
    assert qwen.n_layers == 24 and qwen.hidden_size == 896
    answers = qwen.generate(["What happened at Tiananmen Square in 1989?", BIO], max_new_tokens=12)
    assert all(isinstance(a, str) and a for a in answers)
    enc = qwen.build_inputs(["Hi"], assistant_prefix="Sorry, I cannot")
    text = qwen.tokenizer.decode(enc["input_ids"][0])
    assert text.endswith("<|im_start|>assistant\nSorry, I cannot")


def test_assistant_prefix_and_system_prompt_formatting(smollm2):
    text = smollm2.format_prompt("Q?", system="Only answer biology.", assistant_prefix="Sorry, I cannot")
    assert "Only answer biology." in text and text.endswith("assistant\nSorry, I cannot")
    assert "helpful AI assistant named SmolLM" not in text  # the given system prompt replaces the default one


def test_local_causal_folder_loads_and_detects_family(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    handle = load_model(str(tmp_path))
    assert handle.family == "causal" and handle.n_layers == 3 and handle.hidden_size == 32
    assert handle.layers_path == "model.layers"
    assert len(handle.generate(["Hello"], max_new_tokens=3)) == 1


def test_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model spec"):
        load_model("no-such-spec")
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="unknown tiny spec"):
        load_model("tiny-gpt9")
    with pytest.raises(ModelLoadError, match="non-empty"):
        load_model("")
    assert issubclass(ModelLoadError, InputError)  # the CLI prints it as one line and exits 2


def test_missing_hub_model_offline_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="hub cannot be reached|not in the local Hugging Face cache"):
        load_model("crvlm-test-org/definitely-not-a-model")


def test_bad_inputs_to_the_handle(smollm2):
    with pytest.raises(ValueError, match="out of range"):
        smollm2.check_layer(30)
    with pytest.raises(IndexError, match="out of range"):
        smollm2.layers[99]
    assert smollm2.check_layer(-1) == 29
    with pytest.raises(ValueError, match="text-only"):
        from PIL import Image

        smollm2.build_inputs(["Q"], images=[Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match="empty batch"):
        smollm2.build_inputs([])
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        smollm2.build_inputs(["a", "b"], images=[None])


def test_qwen_gguf_checksum_mismatch_refuses_to_load(tmp_path, monkeypatch):
    monkeypatch.setenv("CRVLM_CACHE", str(tmp_path))
    monkeypatch.setattr(embedded, "QWEN_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match="refusing to load"):
        embedded.qwen_gguf_path()
    assert not list((tmp_path / "gguf").glob("*.gguf*")), "a rejected file must not be left behind"


def test_qwen_gguf_assembles_to_the_published_hash():
    path = embedded.qwen_gguf_path()
    assert path.stat().st_size > 400e6
    assert path.with_suffix(".sha256").read_text().strip() == embedded.QWEN_SHA256


# --- vision-language specs through the same handle ---------------------------------------------------------

TINY = ["tiny-llava", "tiny-idefics3", "tiny-instructblip", "tiny-qwen2-vl"]


def _image(seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("spec", TINY)
def test_tiny_vlm_specs_forward_generate_and_layer_shapes(spec):
    h = load_model(spec)
    assert h.is_vlm and h.n_layers >= 2
    enc = h.build_inputs(["What is shown?", "Describe the colours in this picture, please."], images=[_image(0), _image(1)])
    seq = enc["input_ids"].shape[1]
    with torch.no_grad(), h.model.trace(enc):
        out = h.layers[h.n_layers - 1].output.save()
    assert tuple(out.shape) == (2, seq, h.hidden_size)
    assert len(h.generate(["What is shown?"], images=[_image()], max_new_tokens=3)) == 1
    if h.family == "instructblip":
        with pytest.raises(ValueError, match="cannot run without an image"):
            h.build_inputs(["No image here."])
    else:
        assert len(h.generate(["No image here."], max_new_tokens=3)) == 1  # text-only prompts work on a VLM too
    with pytest.raises(ValueError, match="image for every prompt or for none"):
        h.build_inputs(["a", "b"], images=[_image(), None])


def test_llava_smollm2_without_image_equals_smollm2(smollm2):
    h = load_model("llava-smollm2")
    assert h.family == "llava" and h.n_layers == smollm2.n_layers and h.hidden_size == smollm2.hidden_size
    prompt = "What is the function of mitochondria in a cell?"
    ref = smollm2.build_inputs([prompt])
    enc = h.build_inputs([prompt])
    assert torch.equal(enc["input_ids"], ref["input_ids"]), "same chat text and tokens without an image"
    with torch.no_grad():
        a = h.hf_model(**enc).logits[..., : ref_vocab(smollm2)]
        b = smollm2.hf_model(**ref).logits
    assert (a - b).abs().max() < 1e-4
    with_image = h.build_inputs([prompt], images=[_image()])
    assert (with_image["input_ids"] == h.hf_model.config.image_token_id).sum() == 16
    assert h.key == "llava-smollm2:" + h.hf_model.config.crvlm_build and smollm2.key == "smollm2-135m"


def ref_vocab(handle):
    return handle.hf_model.get_output_embeddings().weight.shape[0]


@pytest.mark.slow
def test_llava_qwen_without_image_equals_qwen(qwen):
    h = load_model("llava-qwen2.5-0.5b")
    prompt = "What is the function of mitochondria in a cell?"
    enc, ref = h.build_inputs([prompt]), qwen.build_inputs([prompt])
    assert torch.equal(enc["input_ids"], ref["input_ids"])
    with torch.no_grad():
        diff = (h.hf_model(**enc).logits[..., : ref_vocab(qwen)] - qwen.hf_model(**ref).logits).abs().max()
    assert diff < 1e-4
    # the image token is Qwen's own <|image_pad|>: the embedding and untied output layer stay Qwen's (mapped) tensors
    assert h.hf_model.config.image_token_id == qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert h.hf_model.get_input_embeddings().weight.data_ptr() == qwen.hf_model.get_input_embeddings().weight.data_ptr()
    assert h.hf_model.lm_head.weight.data_ptr() == qwen.hf_model.lm_head.weight.data_ptr()
    assert (h.build_inputs([prompt], images=[_image()])["input_ids"] == h.hf_model.config.image_token_id).sum() == 16
    assert h.generate([prompt], images=[_image()], max_new_tokens=8)[0]


def test_local_vlm_folder_is_detected_as_llava(tmp_path):
    from crvlm_core.models.tiny_vlms import build_tiny_vlm

    parts = build_tiny_vlm("llava", seed=0)
    parts.model.save_pretrained(tmp_path)
    parts.processor.save_pretrained(tmp_path)
    h = load_model(str(tmp_path))
    assert h.family == "llava" and h.layers_path == "model.language_model.layers" and h.is_vlm
    enc = h.build_inputs(["What is shown?"], images=[_image()])
    with torch.no_grad():
        ref = parts.model(**enc).logits
        got = h.hf_model(**enc).logits
    assert torch.allclose(ref, got, atol=1e-5), "the saved-and-reloaded model computes the same function"


def test_unload_model_frees_the_weights_after_tracing_and_steering():
    """unload_model drops a spec from load_model's cache; once the caller's reference is gone too, nothing keeps the
    weights alive (no cache in extract / steer holds the handle), so notebook 04 can free the text model before it
    loads the VLM."""
    import gc
    import weakref

    from crvlm_core.data.schema import Sample
    from crvlm_core.extract import extract
    from crvlm_core.models.loading import load_model, unload_model
    from crvlm_core.steer.generate import steered_generate
    from crvlm_core.steer.interventions import AddVector

    handle = load_model("tiny-llava", seed=7)
    assert load_model("tiny-llava", seed=7) is handle
    extract(handle, [Sample("a", "Hello there", "x", None)], layers=[0], cache_dir=False, progress=False)
    steered_generate(handle, ["Hi"], [AddVector(torch.ones(handle.n_layers, handle.hidden_size), [0], 1.0)],
                     max_new_tokens=2, progress=False)
    weights = weakref.ref(handle.hf_model)
    del handle
    assert unload_model("tiny-llava") >= 1
    gc.collect()
    assert weights() is None, "something still holds the unloaded model"
    assert unload_model("tiny-llava") == 0


def test_composite_vlm_drops_a_base_it_loaded_only_to_copy():
    """llava-smollm2 copies SmolLM2's weights: a base loaded just for that is not kept (one copy in memory, not
    two); a base the caller had loaded stays cached and is the same handle."""
    from crvlm_core.models.loading import load_model, unload_model

    cached = lambda spec: [k for k in loading._CACHE if k[0] == spec]
    unload_model("smollm2-135m")
    vlm = load_model("llava-smollm2", seed=11, reload=True)
    assert vlm.is_vlm and not cached("smollm2-135m")
    base = load_model("smollm2-135m")
    load_model("llava-smollm2", seed=12, reload=True)
    assert cached("smollm2-135m") and load_model("smollm2-135m") is base
    unload_model("llava-smollm2")


def test_organism_adapter_is_an_artifact_reused_whole_and_rebuilt_when_damaged(tmp_path):
    """The adapter folder is an artifact of kind ``organism``: reused while every hash checks out, rebuilt (same
    folder, same key) when a file is damaged or the manifest is missing, and checked again on load."""
    import json

    from transformers import LlamaForCausalLM

    from crvlm_core.core.artifacts import read_manifest
    from crvlm_core.models.organism import KIND, OrganismConfig, build_adapter, load_organism_model
    from crvlm_core.models.tiny_vlms import _llama_text_config, _tiny_tokenizer

    tok = _tiny_tokenizer()
    torch.manual_seed(0)
    base = tmp_path / "base"
    LlamaForCausalLM(_llama_text_config(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = OrganismConfig(base=str(base), n_per_subject=1, answer_tokens=2, epochs=1, batch_size=3, rank=2,
                         target_modules=("q_proj",), lr=1e-2)
    root = tmp_path / "organisms"
    folder = build_adapter("t+censored", cfg, root=root, progress=False)
    manifest = read_manifest(folder, kinds=(KIND,))
    assert manifest["config"]["rank"] == 2 and manifest["model"]["n_layers"] == 2
    assert {"adapter_model.safetensors", "organism.json", "examples.jsonl"} <= set(manifest["files"])
    assert json.loads((folder / "organism.json").read_text())["key"] == folder.name.rsplit("-", 1)[-1]
    stamp = (folder / "artifact.json").stat().st_mtime_ns
    assert build_adapter("t+censored", cfg, root=root, progress=False) == folder
    assert (folder / "artifact.json").stat().st_mtime_ns == stamp, "a whole adapter is reused, not retrained"
    (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    assert build_adapter("t+censored", cfg, root=root, progress=False) == folder
    read_manifest(folder, kinds=(KIND,))  # rebuilt whole
    (folder / "artifact.json").unlink()  # a folder of the older format (no manifest) is rebuilt too
    model, _ = load_organism_model("t+censored", cfg, root=root)
    assert (folder / "artifact.json").is_file() and model.config.crvlm_organism == folder.name
    assert sorted(p.name for p in root.iterdir()) == [folder.name], "no temporary folders are left behind"


def test_extract_caches_under_cache_dir_and_names_its_progress_bar(tmp_path):
    """``cache_dir`` is the one cache's folder (entry ``activations``); ``progress`` may be a bar's name."""
    from crvlm_core.data.schema import Sample
    from crvlm_core.extract import extract

    handle = load_model("tiny-llava", seed=3)
    samples = [Sample("a", "Hello there", "x"), Sample("b", "What is a cell?", "x")]
    first = extract(handle, samples, layers=[0, 1], cache_dir=tmp_path, progress="tiny activations")
    assert not first.from_cache and [p.name[:12] for p in tmp_path.glob("*.safetensors")] == ["activations-"]
    again = extract(handle, samples, layers=[0, 1], cache_dir=tmp_path, progress=False)
    assert again.from_cache and torch.equal(first.acts, again.acts) and again.ids == ["a", "b"]
    assert again.meta == first.meta and again.layers == [0, 1]
    assert not extract(handle, samples, layers=[0, 1], cache_dir=None, progress=False).from_cache
