"""Remote-safe traces (#22): every trace the library opens runs under nnsight's simulation of a remote server
(``remote="local"``, made strict: the project's modules are out of reach while the trace is rebuilt) and gives what
the local run gives — extraction, the refusal score, steered generation with a vector and with a calibrator."""

import json

import pytest
import torch

from crvlm_core.core.errors import InputError
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.extract import extract
from crvlm_core.methods.crvlm.config import CrvlmConfig
from crvlm_core.methods.crvlm.steering import fit_crvlm
from crvlm_core.models.loading import load_model
from crvlm_core.models.remote import check_remote, unregistered
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector
from crvlm_core.steer.score import refusal_score


@pytest.fixture(scope="module")
def remote(smollm2):
    plain = load_model("smollm2-135m", device="cpu")  # the cached handle now (a test before may have reloaded it)
    handle = load_model("smollm2-135m", device="cpu", remote="local")
    assert handle.remote == "local" and plain.remote is None and handle.hf_model is plain.hf_model
    return handle


@pytest.fixture(scope="module")
def prompts():
    return [s.prompt for s in load_dataset("mmlu")[:6]]


@pytest.fixture(scope="module")
def vector(smollm2):
    return AddVector(torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(0)) * 3,
                     (5,), 1.0)


def test_extraction_and_refusal_score_match(smollm2, remote, vector, prompts):
    samples = load_dataset("mmlu")[:6]
    here = extract(smollm2, samples, layers=[3, 7], cache_dir=None, progress=False)
    there = extract(remote, samples, layers=[3, 7], cache_dir=None, progress=False)
    assert torch.equal(here.acts, there.acts)
    assert torch.allclose(refusal_score(smollm2, prompts, [vector]), refusal_score(remote, prompts, [vector]),
                          atol=1e-5)


def test_generation_with_a_vector_matches(smollm2, remote, vector, prompts):
    plain = steered_generate(smollm2, prompts, max_new_tokens=8)
    steered = steered_generate(smollm2, prompts, [vector], max_new_tokens=8)
    assert steered != plain  # the vector changes the answers, so equal answers below mean something
    assert steered_generate(remote, prompts, [vector], max_new_tokens=8) == steered
    assert steered_generate(remote, prompts, max_new_tokens=8) == plain


def test_generation_with_a_calibrator_matches(smollm2, remote, tmp_path):
    train, test = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=6, n_test=3, seed=42)
    steering = fit_crvlm(smollm2, train, CrvlmConfig(layers=[10], gate_layer="auto", width=64, epochs=30, lr=3e-3,
                                                      target_scale=4.0),
                         cache_dir=tmp_path, progress=False)
    steering.gate_pass = "shared"  # here: the hook backend's one shared prompt pass; remote: the gate's own trace
    prompts = [s.prompt for s in test]
    here = steered_generate(smollm2, prompts, [steering], max_new_tokens=8)
    assert here != steered_generate(smollm2, prompts, max_new_tokens=8)  # it steers (an out-of-scope answer)
    assert steered_generate(remote, prompts, [steering], max_new_tokens=8) == here


def test_a_trace_that_needs_the_library_fails_unless_it_is_shipped(remote, vector, prompts):
    refusal_score(remote, prompts[:2], [vector])  # registered: fine
    with unregistered(), pytest.raises(ModuleNotFoundError, match="crvlm_core"):
        refusal_score(remote, prompts[:2], [vector])


def test_remote_settings_are_checked(monkeypatch):
    assert check_remote(None) is None and check_remote("local") == "local"
    with pytest.raises(InputError, match="--remote must be one of"):
        check_remote("cloud")
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(InputError, match="NDIF_API_KEY"):
        check_remote("ndif")
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    with pytest.raises(Exception, match="hub id"):
        load_model("smollm2-135m", remote="ndif")


def _cli(*argv) -> int:
    from crvlm_core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code


def _answers(folder) -> dict:
    rows = [json.loads(l) for l in (folder / "samples.jsonl").read_text().splitlines()]
    return {r["id"]: r["response"] for r in rows}


@pytest.mark.parametrize("method", ["teacher-forced", "crvlm"])
def test_cli_eval_remote_local_gives_the_local_answers(smollm2, tmp_path, method):
    art = tmp_path / "art"
    extra = ["--epochs", "2", "--width", "16", "--behavioural-epochs", "1"] if method == "crvlm" else ["--alpha", "4"]
    assert _cli("fit", "--model", "smollm2-135m", "--method", method, "--in-scope", "biology", "--layers", "10",
                "--n-train", "3", *extra, "--out", str(art)) == 0
    common = ["eval", "--artifact", str(art), "--n-test", "3", "--max-new-tokens", "6", "--judge", "keyword"]
    assert _cli(*common, "--out", str(tmp_path / "here")) == 0
    assert _cli(*common, "--remote", "local", "--out", str(tmp_path / "there")) == 0
    here, there = _answers(tmp_path / "here"), _answers(tmp_path / "there")
    assert len(here) == 6 and there == here
    placed = json.loads((tmp_path / "there" / "metrics.json").read_text())["placement"]
    assert placed == {"device": "cpu", "dtype": "float32", "device_map": None, "remote": "local"}
    if method == "teacher-forced":  # the fit's extraction remotely: the same vector, byte for byte
        assert _cli("fit", "--model", "smollm2-135m", "--method", method, "--in-scope", "biology", "--layers", "10",
                    "--n-train", "3", *extra, "--remote", "local", "--out", str(tmp_path / "art-remote")) == 0
        assert (tmp_path / "art-remote" / "vector.safetensors").read_bytes() == (art / "vector.safetensors").read_bytes()
        assert json.loads((tmp_path / "art-remote" / "fit.json").read_text())["placement"]["remote"] == "local"


def test_cli_placement_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    base = ["eval", "--model", "smollm2-135m", "--in-scope", "biology", "--n-test", "1", "--out", str(tmp_path / "e")]
    assert _cli(*base, "--remote", "ndif") == 2
    assert "NDIF_API_KEY" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert _cli(*base, "--device", "cuda") == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert _cli(*base, "--device", "tpu9") == 2
    assert "not a device" in capsys.readouterr().err
    assert _cli(*base, "--device-map", "auto") == 2  # a built-in spec
    assert "hub ids and local folders" in capsys.readouterr().err
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    assert _cli("fit", "--model", "smollm2-135m", "--method", "lora", "--in-scope", "biology", "--remote", "ndif",
                "--out", str(tmp_path / "f")) == 2
    assert "LoRA" in capsys.readouterr().err


def test_device_map_auto_places_a_local_folder_and_steers_as_before(tmp_path, smollm2):
    """``--device-map auto`` (accelerate's placement, for a model larger than one GPU) on a local folder: on this CPU
    machine everything lands on the CPU, and steered generation equals the plainly loaded model's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    plain = load_model(str(tmp_path), device="cpu")
    mapped = load_model(str(tmp_path), device_map="auto")
    assert mapped is not plain and mapped.info["device_map"] and "device_map" not in plain.info
    iv = AddVector(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)) * 4, (1,), 1.0)
    prompts = ["Hello there", "What is DNA?"]
    assert steered_generate(mapped, prompts, [iv], max_new_tokens=5) == steered_generate(plain, prompts, [iv],
                                                                                            max_new_tokens=5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run")
def test_gpu_check_script_without_a_gpu_is_one_line(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), str(tmp_path / "gpu")],
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("gpu_check:")]
    assert proc.returncode == 2 and len(lines) == 1 and "GPU" in lines[0]
    assert not (tmp_path / "gpu").exists()
