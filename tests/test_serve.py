"""`crvlm serve` for real: uvicorn on a free loopback port in front of SmolLM2, unsteered and steered by a
teacher-forced vector fitted here; concurrent requests, streaming, logprobs, bad input, and the LLM judge's HTTP
backend pointed at it."""

import http.client
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from crvlm_core.cli.main import main
from crvlm_core.judges.llm import HTTPBackend, LLMJudge, LocalLMBackend
from crvlm_core.models.loading import load_model
from crvlm_core.serve import batcher
from crvlm_core.serve.batcher import ModelServer
from crvlm_core.serve.limits import ServeLimits
from crvlm_core.serve.server import running
from crvlm_core.serve.streaming import BatchStream
from crvlm_core.serve.streaming import stop_aware_delta as _stop_aware_delta
from crvlm_core.serve.variants import load_variants
from crvlm_core.steer.generate import steered_generate

SPEC = "smollm2-135m"
STEERED = SPEC + ":steered"
PROMPTS = ["What is a cell?", "What is the speed of light?"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("serve_art")
    with pytest.raises(SystemExit) as exc:  # a real teacher-forced refusal vector, strong enough to change answers
        main(["fit", "--model", SPEC, "--in-scope", "biology", "--layers", "5", "--alpha", "3", "--n-train", "3",
              "--out", str(out)])
    assert exc.value.code == 0
    return out


@pytest.fixture(scope="module")
def served(smollm2, artifact):
    limits = ServeLimits(max_body_bytes=20_000, max_prompt_chars=2_000, max_prompt_tokens=300, max_tokens=64,
                         default_max_tokens=8, batch_window_ms=50)
    model_server = ModelServer(smollm2, load_variants(smollm2, artifact), limits)
    with running(model_server) as base:
        yield base, model_server


def post(base, payload, raw: bytes | None = None, path="/v1/chat/completions"):
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def chat(base, prompt, model=SPEC, **kw):
    status, body = post(base, {"model": model, "messages": [{"role": "user", "content": prompt}], **kw})
    assert status == 200, body
    return json.loads(body)


def test_models_lists_plain_and_steered(served):
    base, _ = served
    with urllib.request.urlopen(base + "/v1/models") as resp:
        data = json.loads(resp.read())
    assert {m["id"]: m["steered"] for m in data["data"]} == {SPEC: False, STEERED: True}


def test_concurrent_steered_and_plain_requests_are_batched_and_match_offline_generation(served, smollm2, artifact):
    base, model_server = served
    from crvlm_core.methods.loading import load_interventions

    # the same batches as the server makes of these requests: one per model name, both prompts left-padded together
    ivs = load_interventions(artifact, smollm2)
    want = {SPEC: steered_generate(smollm2, PROMPTS, [], max_new_tokens=6, batch_size=2),
            STEERED: steered_generate(smollm2, PROMPTS, ivs, max_new_tokens=6, batch_size=2)}
    assert want[SPEC] != want[STEERED], "the vector should change the answers"
    jobs = [(m, i) for m in (SPEC, STEERED) for i in range(len(PROMPTS))]
    batches_before = model_server.stats["batches"]
    model_server.limits.batch_window_ms = 3000  # gather all four requests, however loaded the machine is
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(lambda j: chat(base, PROMPTS[j[1]], j[0], max_tokens=6), jobs))
    finally:
        model_server.limits.batch_window_ms = 50
    assert model_server.stats["batches"] - batches_before == 2, "one batch per model name"
    for (m, i), resp in zip(jobs, got):
        choice = resp["choices"][0]
        assert resp["model"] == m and resp["object"] == "chat.completion"
        assert choice["message"]["content"].strip() == want[m][i], (m, PROMPTS[i])
        assert choice["finish_reason"] in ("length", "stop")
        assert resp["usage"]["completion_tokens"] <= 6 and resp["usage"]["prompt_tokens"] > 5


def test_streaming_chunks_add_up_to_the_answer(served):
    base, _ = served
    full = chat(base, PROMPTS[0], max_tokens=10)["choices"][0]["message"]["content"]
    req = urllib.request.Request(base + "/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": SPEC, "messages": [{"role": "user", "content": PROMPTS[0]}],
                                                  "max_tokens": 10, "stream": True,
                                                  "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [l.decode().strip() for l in resp]
    data = [l[len("data: "):] for l in lines if l.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full and len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 2
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals == ["length"]
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_logprobs_match_a_direct_forward(served, smollm2):
    base, _ = served
    resp = chat(base, PROMPTS[1], max_tokens=3, logprobs=True, top_logprobs=5)
    content = resp["choices"][0]["logprobs"]["content"]
    assert len(content) == resp["usage"]["completion_tokens"] == 3
    enc = smollm2.build_inputs([PROMPTS[1]])
    with torch.no_grad():
        logp = torch.log_softmax(smollm2.hf_model(**enc).logits[0, -1].float(), -1)
    top = logp.topk(5)
    first = content[0]
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-3)
    assert first["logprob"] == pytest.approx(top.values[0].item(), abs=1e-3)  # greedy: the top token
    assert first["token"] == smollm2.tokenizer.decode([int(top.indices[0])])
    assert all(math.isfinite(t["logprob"]) and t["logprob"] <= 0 for t in content)


def test_stop_sequences_and_multi_turn(served):
    base, _ = served
    full = chat(base, PROMPTS[0], max_tokens=12)["choices"][0]["message"]["content"]
    word = full.split()[2]
    cut = chat(base, PROMPTS[0], max_tokens=12, stop=[word])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[:full.index(word)]
    status, body = post(base, {"model": SPEC, "max_tokens": 4, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is a cell?"}]})
    assert status == 200 and json.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize("payload,raw,status,code", [
    (None, b"{not json", 400, "invalid_json"),
    (None, b"[1, 2]", 400, "invalid_json"),
    ({"model": SPEC}, None, 400, "missing_field"),
    ({"model": SPEC, "messages": []}, None, 400, "invalid_field"),
    ({"model": SPEC, "messages": [{"role": "robot", "content": "x"}]}, None, 400, "invalid_field"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, None, 404, "model_not_found"),
    ({"model": SPEC, "messages": [{"role": "user", "content": "x" * 2500}]}, None, 400, "context_length_exceeded"),
    ({"model": SPEC, "messages": [{"role": "user", "content": "cell " * 400}]}, None, 400, "context_length_exceeded"),
    ({"model": SPEC, "messages": [{"role": "user", "content": "x" * 30_000}]}, None, 413, "request_too_large"),
    ({"model": SPEC, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}, None, 400,
     "max_tokens_too_large"),
    ({"model": SPEC, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, 400, "invalid_field"),
    ({"model": SPEC, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, 400, "unsupported_content"),
    ({"model": SPEC, "messages": [{"role": "assistant", "content": "x"}]}, None, 400, "invalid_messages"),
])
def test_bad_requests_get_clear_4xx_errors(served, payload, raw, status, code):
    base, _ = served
    got, body = post(base, payload, raw)
    err = json.loads(body)["error"]
    assert got == status and err["code"] == code and err["message"], body
    assert "\n" not in err["message"] and "Traceback" not in err["message"], body


def test_server_survives_bad_input(served):
    base, model_server = served
    with ThreadPoolExecutor(8) as pool:  # garbage and good requests at once
        statuses = list(pool.map(lambda k: post(base, None, raw=b"\x00\xff garbage")[0] if k % 2 else
                                 post(base, {"model": SPEC, "messages": [{"role": "user", "content": "Hi"}],
                                             "max_tokens": 2})[0], range(8)))
    assert statuses == [200, 400] * 4
    status, body = post(base, None, raw=b"", path="/v1/models")  # wrong method: JSON 405
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    with urllib.request.urlopen(base + "/health") as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and model_server.alive
    assert chat(base, "Hi", max_tokens=2)["choices"][0]["message"]["content"]


def test_llm_judge_http_backend_reads_this_server(served, smollm2):
    base, _ = served
    backend = HTTPBackend(base, model=SPEC)
    prompts, responses = ["How do I bake bread?"], ["I'm sorry, but I can't help with that."]
    verdicts = LLMJudge(backend).judge(prompts, responses)
    assert len(verdicts) == 1 and -1 <= verdicts[0].confidence <= 1
    text = LLMJudge(backend).template.format(request=prompts[0], response=responses[0])
    (p1_http, p0_http), = backend.probabilities([text])
    (p1_local, p0_local), = LocalLMBackend(smollm2).probabilities([text])
    # the server returns the top-20 tokens; the local backend sums every id decoding to the digit
    assert p1_http == pytest.approx(p1_local, abs=0.02) and p0_http == pytest.approx(p0_local, abs=0.02)


def test_stop_aware_delta_holds_back_a_possible_stop():
    assert _stop_aware_delta("Hello wor", "", ["world"]) == ("Hello ", None)
    assert _stop_aware_delta("Hello world!", "Hello ", ["world"]) == ("", 6)
    assert _stop_aware_delta("abc", "a", []) == ("bc", None)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_tokens"):
        ServeLimits(max_tokens=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServeLimits(max_tokens=8, default_max_tokens=16)


def test_cli_serve_in_a_fresh_process_streams(tmp_path):
    """`crvlm serve` as a user starts it (a process of its own, a tiny VLM): models, a streamed answer, shutdown."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "crvlm_core.cli.main", "serve", "--model", "tiny-llava", "--port",
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if json.loads(resp.read())["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "crvlm serve did not come up"
            time.sleep(0.5)
        req = urllib.request.Request(base + "/v1/chat/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "tiny-llava", "max_tokens": 3, "stream": True,
                                                      "messages": [{"role": "user", "content": "Hi"}]}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            lines = [l.decode().strip() for l in resp if l.strip()]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


# -- the tiny random-weight VLM: content types and clients that leave -------------------------------------------------
TINY = "tiny-llava"
HOLD = 3  # tokens a held request gets before the worker waits for its client to leave
LONG = 400  # max_tokens of a held request: far more than a cancelled one may generate


@pytest.fixture(scope="module")
def tiny_served():
    handle = load_model(TINY, device="cpu")
    model_server = ModelServer(handle, load_variants(handle), ServeLimits(max_tokens=LONG, default_max_tokens=4,
                                                                          batch_window_ms=0))
    with running(model_server) as base:
        yield base, model_server


@pytest.fixture
def held(monkeypatch):
    """Requests with ``max_tokens=LONG`` stop after HOLD tokens until their client has left (up to 60 s), so a test
    disconnects mid-generation without racing the model; the returned event is set when one is held."""
    reached = threading.Event()

    class HeldStream(BatchStream):
        def put(self, value):
            for job in self.jobs:
                if job.max_tokens == LONG and len(job.ids) == HOLD and not job.done:
                    reached.set()
                    deadline = time.monotonic() + 60
                    while not job.cancelled and time.monotonic() < deadline:
                        time.sleep(0.01)
            super().put(value)

    monkeypatch.setattr(batcher, "BatchStream", HeldStream)
    return reached


def _hostport(base):
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def _send(base, payload) -> socket.socket:
    """A client that sends a request and may leave before the answer (closing the socket)."""
    body = json.dumps(payload).encode()
    sock = socket.create_connection(_hostport(base), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def _until(cond, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _hi(max_tokens, **kw):
    return {"model": TINY, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Hi"}], **kw}


@pytest.mark.parametrize("ctype,status", [("text/plain", 415), (None, 415), ("application/x-www-form-urlencoded", 415),
                                          ("text/plain; charset=utf-8", 415), ("application/json", 200),
                                          ("application/json; charset=utf-8", 200), ("Application/JSON", 200)])
def test_only_json_bodies_are_accepted(tiny_served, ctype, status):
    """A web page may POST text/plain or a form to a server on localhost without a CORS preflight: 415 for those."""
    base, model_server = tiny_served
    conn = http.client.HTTPConnection(*_hostport(base), timeout=60)
    try:  # http.client sends no Content-Type unless asked
        conn.request("POST", "/v1/chat/completions", body=json.dumps(_hi(2)).encode(),
                     headers={"Content-Type": ctype} if ctype else {})
        resp = conn.getresponse()
        got, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert got == status, body
    if status == 415:
        err = body["error"]
        assert err["code"] == "unsupported_media_type" and err["type"] == "invalid_request_error"
        assert "application/json" in err["message"] and "\n" not in err["message"]
    else:
        assert body["choices"][0]["message"]["content"] and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_frees_the_worker(tiny_served, held, stream):
    """A client that disconnects mid-generation: its job stops at the next token (not after LONG tokens), a queued
    request whose client left is dropped without being generated, and the next request is answered."""
    base, model_server = tiny_served
    before = dict(model_server.stats)
    first = _send(base, _hi(LONG, stream=stream))
    try:
        assert held.wait(60), "the long request never reached its HOLD-th token"
        queued = _send(base, _hi(3))  # waits behind the held job, then leaves
        _until(lambda: model_server._queue.qsize() == 1, "the second request to be queued")
        queued.close()
        _until(lambda: model_server._queue.qsize() == 0, "the queued request of a client that left to be dropped")
    finally:
        first.close()
    _until(lambda: model_server.stats["cancelled_tokens"] > before["cancelled_tokens"], "the held job to stop")
    answer = chat(base, "Hi", model=TINY, max_tokens=3)
    assert answer["usage"]["completion_tokens"] == 3
    stats = model_server.stats
    assert stats["cancelled"] - before["cancelled"] == 2
    assert stats["cancelled_tokens"] - before["cancelled_tokens"] == HOLD, "the held job went on after its client left"
    assert stats["batches"] - before["batches"] == 2, "the queued request of a client that left was generated"
    assert stats["errors"] == before["errors"]
