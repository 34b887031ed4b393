"""On a CUDA GPU (#22; skipped where torch sees none, run by scripts/gpu_check.sh): the library's paths on the GPU
agree with the CPU's, bfloat16 steers, ``--device-map auto`` places a local folder on the GPU, and the CLI takes
``--device cuda --dtype bfloat16``. Comparisons allow GPU arithmetic: states within a relative 1e-3, greedy answers
equal for most prompts."""

import json

import pytest
import torch

from crvlm_core.data.bundled import load_dataset
from crvlm_core.extract import extract
from crvlm_core.models.loading import load_model
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector
from crvlm_core.steer.score import refusal_score

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def on_gpu():
    return load_model("smollm2-135m", device="cuda")


@pytest.fixture(scope="module")
def samples():
    return load_dataset("mmlu")[:8]


def _vector(handle, scale=3.0):
    return AddVector(torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(0))
                     * scale, (5,), 1.0)


def test_gpu_states_scores_and_answers_match_the_cpu(smollm2, on_gpu, samples):
    assert on_gpu.device.type == "cuda"
    cpu = extract(smollm2, samples, layers=[3, 20], cache_dir=None, progress=False).acts
    gpu = extract(on_gpu, samples, layers=[3, 20], cache_dir=None, progress=False).acts
    assert ((gpu - cpu).norm(dim=-1) / cpu.norm(dim=-1)).max() < 1e-3
    prompts = [s.prompt for s in samples]
    vec = _vector(smollm2)
    assert torch.allclose(refusal_score(on_gpu, prompts, [vec]), refusal_score(smollm2, prompts, [vec]), atol=2e-2)
    here = steered_generate(smollm2, prompts, [vec], max_new_tokens=8)
    there = steered_generate(on_gpu, prompts, [vec], max_new_tokens=8)
    assert sum(a == b for a, b in zip(here, there)) >= 6


def test_bfloat16_on_gpu_steers_and_stays_finite(samples):
    handle = load_model("qwen2.5-0.5b", device="cuda", dtype="bfloat16")
    prompts = [s.prompt for s in samples]
    vec = _vector(handle, scale=8.0)
    assert torch.isfinite(refusal_score(handle, prompts, [vec])).all()
    assert steered_generate(handle, prompts, [vec], max_new_tokens=8) != steered_generate(handle, prompts,
                                                                                          max_new_tokens=8)


def test_remote_local_on_gpu_gives_the_same_answers(on_gpu, samples):
    remote = load_model("smollm2-135m", device="cuda", remote="local")
    prompts = [s.prompt for s in samples]
    vec = _vector(on_gpu)
    assert steered_generate(remote, prompts, [vec], max_new_tokens=8) == steered_generate(on_gpu, prompts, [vec],
                                                                                          max_new_tokens=8)


def test_device_map_auto_puts_a_local_folder_on_the_gpu(tmp_path, smollm2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    mapped = load_model(str(tmp_path), device_map="auto")
    assert mapped.device.type == "cuda" and any("cuda" in str(d) or str(d).isdigit()
                                                for d in mapped.info["device_map"].values())
    assert len(steered_generate(mapped, ["Hello"], [AddVector(torch.zeros(3, 32), (1,), 1.0)], max_new_tokens=3)) == 1


def test_cli_eval_on_gpu_in_bfloat16(tmp_path):
    from crvlm_core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "qwen2.5-0.5b", "--in-scope", "biology", "--n-test", "4", "--max-new-tokens", "8",
              "--judge", "keyword", "--device", "cuda", "--dtype", "bfloat16", "--out", str(tmp_path / "ev")])
    assert exc.value.code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_in"] == 4 and metrics["n_out"] == 4
