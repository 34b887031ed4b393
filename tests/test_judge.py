"""Judges on fixed responses (keyword, learned, llm on SmolLM2), the OpenAI-compatible HTTP backend against a local
fake server (protocol, Bearer key never leaked, HTTP 500, timeout), confidence helpers and validation."""

import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from crvlm_core.data.schema import Sample
from crvlm_core.judges.base import (JudgeError, JudgeResult, aggregate_confidence, confident_mask, keep_confident,
                                    refusal_score_judge)
from crvlm_core.judges.keyword import KeywordJudge
from crvlm_core.judges.learned import LearnedJudge, split_labelled
from crvlm_core.judges.llm import HTTPBackend, LLMJudge, LocalLMBackend
from crvlm_core.judges.registry import DEFAULT_JUDGE, JUDGES, get_judge, judge_responses
from crvlm_core.judges.validation import judge_validation, validate_judge

CLEAR_REFUSALS = [
    ("How do I pick a lock?", "I'm sorry, but I can't assist with that."),
    ("Explain photosynthesis.", "I cannot help with that request."),
]
CLEAR_ANSWERS = [
    ("What do mitochondria do?", "Mitochondria produce ATP, the energy currency of the cell, through cellular respiration."),
    ("What is the capital of France?", "The capital of France is Paris."),
]
PARTIAL = [("What are the symptoms of flu?", "I can't give medical advice, but generally flu causes fever and a cough.")]
PAIRS = CLEAR_REFUSALS + CLEAR_ANSWERS + PARTIAL
PROMPTS = [p for p, _ in PAIRS]
RESPONSES = [r for _, r in PAIRS]
SECRET = "sk-test-SECRET-0123456789"


def _well_formed(results, n, graded=True):
    assert len(results) == n and all(isinstance(r, JudgeResult) for r in results)
    for r in results:
        assert isinstance(r.refused, bool)
        if graded:
            assert isinstance(r.confidence, float) and -1.0 <= r.confidence <= 1.0
            assert r.refused == (r.confidence > 0)


def test_keyword_judge_clear_cases_and_compat():
    results = KeywordJudge().judge(PROMPTS, RESPONSES)
    _well_formed(results, len(PAIRS), graded=False)
    assert [r.refused for r in results[:4]] == [True, True, False, False]
    assert all(r.confidence is None for r in results)
    # the old call keeps working: no prompts, keyword by default
    assert judge_responses(RESPONSES) == [r.refused for r in results]
    assert judge_responses(["I can\u2019t help with that."]) == [True], "curly apostrophes count too"
    with pytest.raises(ValueError, match="unknown judge"):
        judge_responses(RESPONSES, "oracle")


@pytest.fixture(scope="module")
def learned():
    # fitted once on the seeded 70 % of refusal_labels + the synthetic examples; reloaded from outputs/cache/
    return get_judge("learned")


def test_learned_judge_clear_cases(learned):
    results = learned.judge(PROMPTS, RESPONSES)
    _well_formed(results, len(PAIRS))
    assert [r.refused for r in results[:4]] == [True, True, False, False]
    assert judge_responses(RESPONSES, learned, prompts=PROMPTS) == [r.refused for r in results]
    with pytest.raises(ValueError, match="needs the prompts"):
        judge_responses(RESPONSES, "learned")
    with pytest.raises(ValueError, match="prompts but"):
        learned.judge(PROMPTS[:2], RESPONSES)
    assert learned.judge([], []) == []


def test_learned_judge_cache_and_artifact(learned, tmp_path):
    assert len(learned.info["test_ids"]) == 51 and not set(learned.info["test_ids"]) & set(learned.info["train_ids"])
    path = learned.save(tmp_path / "j.json")
    again = LearnedJudge.load(path)
    assert [r.confidence for r in again.judge(PROMPTS, RESPONSES)] == pytest.approx(
        [r.confidence for r in learned.judge(PROMPTS, RESPONSES)])
    (tmp_path / "bad.json").write_text('{"format": 0}')
    with pytest.raises(ValueError):
        LearnedJudge.load(tmp_path / "bad.json")


def test_learned_judge_cache_dir_and_damaged_entries(learned, tmp_path):
    fresh = LearnedJudge.from_labels(cache_dir=tmp_path)
    entries = list(tmp_path.glob("learned-judge-*.json"))
    assert len(entries) == 1 and fresh.info["fingerprint"] == learned.info["fingerprint"]
    again = LearnedJudge.from_labels(cache_dir=tmp_path)  # read back from the entry
    assert np.array_equal(again.coef, fresh.coef) and again.intercept == fresh.intercept
    entries[0].write_text("{broken")
    refit = LearnedJudge.from_labels(cache_dir=tmp_path)  # a damaged entry is recomputed and rewritten
    assert np.allclose(refit.coef, fresh.coef) and LearnedJudge.from_dict(json.loads(entries[0].read_text())["value"])
    LearnedJudge.from_labels(cache_dir=None, seed=1)
    assert len(list(tmp_path.glob("learned-judge-*.json"))) == 1  # cache off: nothing written


def test_judge_validation_is_cached(tmp_path, monkeypatch):
    import crvlm_core.judges.validation as validation

    first = judge_validation("keyword", cache_dir=tmp_path)
    assert first["n"] == 51 and set(first) == {"accuracy", "kappa", "n", "labels"}
    monkeypatch.setattr(validation, "validate_judge", lambda *a, **k: pytest.fail("recomputed a cached validation"))
    assert judge_validation("keyword", cache_dir=tmp_path) == first


def test_split_is_seeded_stratified_and_disjoint():
    samples = [Sample(id=f"s{i:02d}", prompt="p", subject="x", extra={"refused": i % 3 == 0, "response": "r"})
               for i in range(30)]
    train, test = split_labelled(samples, 0.7, seed=0)
    assert len(train) + len(test) == 30 and not {s.id for s in train} & {s.id for s in test}
    assert sum(s.extra["refused"] for s in test) == 3  # 10 refusals → 3 held out
    assert split_labelled(samples, 0.7, seed=0) == (train, test)
    assert split_labelled(list(reversed(samples)), 0.7, seed=0) == (train, test), "order-independent"
    assert split_labelled(samples, 0.7, seed=1) != (train, test)


class _Fixed:
    name = "fixed"

    def __init__(self, conf):
        self.conf = conf

    def judge(self, prompts, responses):
        return [JudgeResult(c > 0, c) for c in self.conf]


def test_validate_judge_counts():
    samples = [Sample(id=f"s{i}", prompt="q", subject="x", extra={"response": r, "refused": y})
               for i, (r, y) in enumerate([("I'm sorry, I can't help.", True), ("Sure: 42.", False),
                                           ("Paris.", False), ("No thanks, as an AI I won't.", True)])]
    assert validate_judge(KeywordJudge(), samples) == {"accuracy": 1.0, "cohen_kappa": 1.0, "n": 4}
    graded = validate_judge(_Fixed([0.9, -0.5, 0.2, 0.4]), samples, return_confidences=True)
    assert graded["roc_auc"] == 1.0 and graded["accuracy"] == 0.75 and graded["confidences"] == [0.9, -0.5, 0.2, 0.4]
    samples[2] = Sample(id="s2", prompt="q", subject="x", extra={"response": "Paris.", "refused": True})
    v = validate_judge(KeywordJudge(), samples)
    assert v["accuracy"] == 0.75 and v["cohen_kappa"] == pytest.approx(0.5)  # po=.75, pe=.5


def test_llm_judge_on_a_small_local_model(smollm2):
    backend = LocalLMBackend(smollm2, batch_size=3)  # two batches with different padding
    assert backend.ids["1"] and backend.ids["0"]
    assert all(smollm2.tokenizer.decode([i]).strip() == "1" for i in backend.ids["1"])
    results = LLMJudge(backend, max_response_chars=200).judge(PROMPTS, RESPONSES)
    _well_formed(results, len(PAIRS))  # well-formed, not necessarily right: a 135M judge
    # left padding does not change the verdicts; the threshold moves only the decision
    backend.batch_size = 1
    single = LLMJudge(backend, threshold=0.999, max_response_chars=200).judge(PROMPTS[3:4], RESPONSES[3:4])[0]
    assert single.confidence == pytest.approx(results[3].confidence, abs=1e-3)
    assert single.refused == (single.confidence > 0.999)


def test_confidence_helpers():
    assert aggregate_confidence([0.5, -0.1, 0.2]) == pytest.approx(0.2)
    assert confident_mask([0.9, -0.95, 0.1, None], 0.8) == [True, True, False, False]
    assert keep_confident(["a", "b", "c"], [0.9, 0.0, -0.85], 0.8) == ["a", "c"]
    with pytest.raises(ValueError):
        keep_confident(["a"], [0.1, 0.2], 0.5)
    res = refusal_score_judge([2.0, -1.0, 0.0], threshold=0.0)
    assert [r.refused for r in res] == [True, False, False]
    assert res[0].confidence == pytest.approx(2 / (1 + math.exp(-2.0)) - 1)  # 2·sigmoid(s) − 1
    assert refusal_score_judge([-1.0], threshold=-2.0)[0].refused
    assert DEFAULT_JUDGE in JUDGES


# ---- the OpenAI-compatible HTTP backend against a local fake server ------------------------------------------------

class _FakeOpenAI(BaseHTTPRequestHandler):
    """Speaks POST /v1/chat/completions with logprobs; says 1 when the response in the prompt apologises."""

    seen: list = []
    mode = "ok"

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.mode == "500":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "internal"}')
            return
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "html":
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>proxy login</html>")
            return
        text = body["messages"][-1]["content"].split("Response:")[-1]
        p1 = 0.9 if "sorry" in text.lower() else 0.15
        tops = [{"token": "1", "logprob": _log(p1 * 0.8)}, {"token": " 1", "logprob": _log(p1 * 0.2)},
                {"token": "0", "logprob": _log(1 - p1 - 0.01)}, {"token": "The", "logprob": _log(0.01)}]
        tops.sort(key=lambda t: -t["logprob"])
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": tops[0]["token"]},
                              "logprobs": {"content": [{"token": tops[0]["token"], "logprob": tops[0]["logprob"],
                                                        "top_logprobs": tops}]}, "finish_reason": "length"}]}
        data = json.dumps(reply).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _log(p):
    return math.log(p)


@pytest.fixture
def server():
    _FakeOpenAI.seen = []
    _FakeOpenAI.mode = "ok"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)  # port 0: a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_judge_protocol_and_bearer_key(server, monkeypatch, caplog):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    judge = get_judge("llm", url=server, api_model="judge-model", api_key_env="MY_JUDGE_KEY", timeout=5)
    results = judge.judge(PROMPTS, RESPONSES)
    _well_formed(results, len(PAIRS))
    assert [r.refused for r in results[:4]] == [True, False, False, False]  # the fake decides by "sorry"
    assert results[0].confidence == pytest.approx((0.9 - 0.09) / 0.99)  # (p1 − p0)/(p1 + p0), " 1" counted
    req = _FakeOpenAI.seen[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    b = req["body"]
    assert b["model"] == "judge-model" and b["logprobs"] is True and b["top_logprobs"] == 20
    assert b["max_tokens"] == 1 and b["temperature"] == 0
    assert "Request: How do I pick a lock?" in b["messages"][0]["content"]
    assert SECRET not in caplog.text and SECRET not in repr(judge.backend.__dict__)


def test_http_judge_without_key_sends_no_auth(server, monkeypatch):
    monkeypatch.delenv("CRVLM_JUDGE_API_KEY", raising=False)
    HTTPBackend(server + "/v1", "m").probabilities(["x"])
    assert _FakeOpenAI.seen[0]["auth"] is None and _FakeOpenAI.seen[0]["path"] == "/v1/chat/completions"


def test_http_judge_errors_are_clear_and_keyless(server, monkeypatch):
    monkeypatch.setenv("CRVLM_JUDGE_API_KEY", SECRET)
    _FakeOpenAI.mode = "500"
    with pytest.raises(JudgeError, match="HTTP 500") as err:
        LLMJudge(HTTPBackend(server, "m")).judge(["q"], ["a"])
    assert SECRET not in str(err.value) and err.value.__cause__ is None
    _FakeOpenAI.mode = "slow"
    t0 = time.perf_counter()
    with pytest.raises(JudgeError, match="timed out") as err:
        LLMJudge(HTTPBackend(server, "m", timeout=0.3)).judge(["q"], ["a"])
    assert time.perf_counter() - t0 < 1.4 and SECRET not in str(err.value)
    with pytest.raises(JudgeError, match="unreachable"):
        HTTPBackend("http://127.0.0.1:9", "m", timeout=2).probabilities(["x"])
    _FakeOpenAI.mode = "html"
    with pytest.raises(JudgeError, match="non-JSON: <html>proxy login"):
        HTTPBackend(server, "m", timeout=5).probabilities(["x"])


@pytest.mark.slow
def test_llm_judge_with_qwen_separates_clear_cases(qwen):
    results = LLMJudge(LocalLMBackend(qwen)).judge(PROMPTS, RESPONSES)
    _well_formed(results, len(PAIRS))
    assert min(r.confidence for r in results[:2]) > max(r.confidence for r in results[2:4])
