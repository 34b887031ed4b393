"""``crvlm serve --engine vllm`` (#22) as far as a CPU machine without vLLM allows: the one-line refusal when vLLM or
a GPU is missing, the residual-stream arithmetic that carries the library's interventions onto vLLM's
``(hidden, residual)`` layer outputs, what the engine refuses, and the engine's HTTP layer driven by the same engine
call on the real SmolLM2."""

import importlib.util
import json

import pytest
import torch

from crvlm_core.core.errors import InputError
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering
from crvlm_core.methods.crvlm.config import CalibratorConfig
from crvlm_core.methods.crvlm.module import Calibrator
from crvlm_core.serve.vllm_engine import (check_engine_interventions, create_vllm_app, handle_generate,
                                          stream_update)
from crvlm_core.steer.generate import steered_generate
from crvlm_core.steer.interventions import AddVector, ProjectOut

D = 16


def _calibrator(gate_dim=None):
    cal = Calibrator(CalibratorConfig(hidden_size=D, layers=[2], width=8, seed=0, gate_dim=gate_dim))
    with torch.no_grad():  # a visible update: α away from its small start
        for p in cal.parameters():
            p.add_(torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    return cal


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(),
                    reason="vLLM and a GPU are here: the engine would start")
def test_serve_vllm_without_vllm_or_gpu_is_one_line(capsys):
    from crvlm_core.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--engine", "vllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "vllm" in err[0] and "CUDA GPU" in err[0]


@pytest.mark.parametrize("make", [
    lambda v: AddVector(v, (2,), 1.5),
    lambda v: ProjectOut(v, (2,), 1.0),
    lambda v: _calibrator().as_intervention(),
    lambda v: CalibratedSteering(_calibrator(), (2,), gate_layer=None),
], ids=["add", "project-out", "calibrator", "calibrated-steering-per-token-gate"])
def test_stream_update_acts_on_hidden_plus_residual(make):
    g = torch.Generator().manual_seed(0)
    iv = make(torch.randn(4, D, generator=g))
    hidden, residual = torch.randn(7, D, generator=g), torch.randn(7, D, generator=g) * 3
    want = iv.apply(2, (hidden + residual).unsqueeze(0)).squeeze(0)
    got = stream_update(iv, 2, hidden, residual) + residual
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(want, hidden + residual)
    assert torch.allclose(stream_update(iv, 2, hidden, None), iv.apply(2, hidden.unsqueeze(0)).squeeze(0), atol=1e-5)


def test_prefill_gates_are_refused_by_the_vllm_engine():
    check_engine_interventions([CalibratedSteering(_calibrator(), (2,), gate_layer=None)])
    with pytest.raises(InputError, match="prefill gate at layer 3"):
        check_engine_interventions([CalibratedSteering(_calibrator(gate_dim=D), (2,), gate_layer=3)])


def test_the_engine_http_layer_answers_plain_and_steered(smollm2):
    from fastapi.testclient import TestClient

    vector = AddVector(torch.randn(smollm2.n_layers, smollm2.hidden_size, generator=torch.Generator().manual_seed(0))
                       * 3, (5,), 1.0)
    variants = {"smollm2-135m": [], "smollm2-135m:steered": [vector]}
    client = TestClient(create_vllm_app(smollm2, variants, handle_generate(smollm2, variants)))
    assert sorted(m["id"] for m in client.get("/v1/models").json()["data"]) == sorted(variants)
    question = "What does the mitochondrion do?"

    def ask(model, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, **extra}
        return client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={"Content-Type": "application/json"})

    plain, steered = (ask(m).json()["choices"][0]["message"]["content"] for m in variants)
    assert plain == steered_generate(smollm2, [question], max_new_tokens=8)[0]
    assert steered == steered_generate(smollm2, [question], [vector], max_new_tokens=8)[0] != plain
    assert ask("smollm2-135m", stream=True).status_code == 400
    assert ask("gpt-9").status_code == 404
    assert ask("smollm2-135m", max_tokens=10_000).json()["error"]["code"] == "max_tokens_too_large"
