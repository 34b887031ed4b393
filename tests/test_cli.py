"""`crvlm fit` / `crvlm eval` round trip on the real SmolLM2 with a few samples, and their input errors."""

import json

import pytest

from crvlm_core.data.bundled import load_dataset
from crvlm_core.cli.main import main
from crvlm_core.cli.options import parse_layers
from crvlm_core.core.errors import InputError


def _run(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_fit_then_eval_round_trip(tmp_path, smollm2):
    art, ev = tmp_path / "art", tmp_path / "eval"
    assert _run(["fit", "--model", "smollm2-135m", "--method", "teacher-forced", "--train", "mmlu",
                 "--in-scope", "biology", "--layers", "8-9", "--alpha", "2", "--n-train", "3", "--out", str(art)]) == 0
    fit = json.loads((art / "fit.json").read_text())
    assert fit["layers"] == [8, 9] and fit["n_out"] == 3 and fit["n_in"] == 3 and fit["method"] == "teacher-forced"
    assert (art / "vector.safetensors").exists() and (art / "vector.json").exists()
    assert _run(["eval", "--artifact", str(art), "--test", "mmlu", "--n-test", "2", "--max-new-tokens", "6", "--judge", "keyword",
                 "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    for key in ("refusal_rate_out", "over_refusal_in", "mb_score", "n_in", "n_out", "judge"):
        assert key in metrics
    assert metrics["n_in"] == 2 and metrics["n_out"] == 2 and metrics["alpha"] == 2.0
    rows = [json.loads(l) for l in (ev / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert set(row) >= {"id", "prompt", "subject", "scope", "response", "refused", "refusal_score"}
    # the samples re-judge as they are (same judge → same verdicts; prompts are the test questions)
    assert _run(["judge", "--input", str(ev / "samples.jsonl"), "--judge", "keyword", "--out", str(tmp_path / "rj")]) == 0
    again = [json.loads(l) for l in (tmp_path / "rj").read_text().splitlines()]
    assert [r["refused"] for r in again] == [r["refused"] for r in rows]
    mmlu = {s.id: s.prompt for s in load_dataset("mmlu")}
    assert all(r["prompt"] == mmlu[r["id"]] for r in rows)
    # unsteered evaluation of the bare model
    assert _run(["eval", "--model", "smollm2-135m", "--test", "mmlu", "--in-scope", "biology", "--n-test", "1", "--judge", "keyword",
                 "--max-new-tokens", "4", "--out", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["method"] == "unsteered"


def test_fit_train_extra_adds_another_sources_questions_by_the_same_scope(tmp_path, smollm2, capsys):
    """#25: ``--train-extra`` joins all of a second source (at most ``--n-train`` per scope) to ``--train``'s part."""
    extra = tmp_path / "extra.jsonl"
    rows = [("b1", "What do white blood cells do?", "biology"), ("b2", "Why do leaves change colour?", "biology"),
            ("g1", "Which ocean is the largest?", "geography")]
    extra.write_text("".join(json.dumps({"id": i, "prompt": p, "subject": s}) + "\n" for i, p, s in rows))
    art = tmp_path / "art"
    assert _run(["fit", "--model", "smollm2-135m", "--train", "mmlu", "--train-extra", str(extra), "--in-scope",
                 "biology", "--layers", "8", "--n-train", "3", "--out", str(art)]) == 0
    fit = json.loads((art / "fit.json").read_text())
    assert fit["train_extra"] == str(extra) and (fit["n_in"], fit["n_out"]) == (5, 4) and fit["n_train_extra"] == 3
    assert f"{extra} (all): 1 out-of-scope / 2 in-scope" in capsys.readouterr().out
    assert _run(["fit", "--model", "smollm2-135m", "--train", "mmlu", "--train-extra", str(extra), "--in-scope",
                 "biology", "--layers", "8", "--n-train", "3", "--n-train-extra", "1", "--out", str(art),
                 "--force"]) == 0  # at most 1 per scope of the extra source
    fit = json.loads((art / "fit.json").read_text())
    assert (fit["n_in"], fit["n_out"], fit["n_train_extra"]) == (4, 4, 1)
    assert _run(["fit", "--model", "smollm2-135m", "--in-scope", "biology", "--n-train-extra", "5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--n-train-extra caps the questions of --train-extra" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--train-extra", str(extra), "--in-scope", "physics",
                 "--out", str(tmp_path / "b")]) == 2
    assert f"--in-scope: unknown subject(s) physics (available in {extra}" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--gate-fit", "probe",
                 "--gate-layer", "none", "--out", str(tmp_path / "c")]) == 2
    assert "--gate-fit probe fits a linear prefill gate" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--hard-gate",
                 "--gate-layer", "none", "--out", str(tmp_path / "d")]) == 2
    assert "--hard-gate rounds a prefill gate's value" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert _run(["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--gate-extra-layers",
                 "99", "--out", str(tmp_path / "e")]) == 2
    assert "--gate-extra-layers 99: layer 99 out of range" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--in-scope-push",
                 "0.5", "--gate-layer", "none", "--out", str(tmp_path / "f")]) == 2
    assert "--in-scope-push acts where a prefill gate reads in scope" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--in-scope", "biology", "--in-scope-push", "-1",
                 "--out", str(tmp_path / "g")]) == 2
    assert "--in-scope-push: must be >= 0, got '-1'" in capsys.readouterr().err


def test_crvlm_takes_its_refusal_vector_from_train_alone_when_train_extra_joins(tmp_path, smollm2):
    """#25: ``--train-extra`` questions teach the calibrator and its gate the scope; the refusal vector is fitted on
    ``--train``'s questions only (the same vector as without the extra source, and its cost stays bounded)."""
    extra = tmp_path / "extra.jsonl"
    rows = [("b1", "What do white blood cells do?", "biology"), ("g1", "Which ocean is the largest?", "geography")]
    extra.write_text("".join(json.dumps({"id": i, "prompt": p, "subject": s}) + "\n" for i, p, s in rows))
    common = ["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--layers", "8",
              "--n-train", "3", "--epochs", "1", "--width", "16", "--behavioural-epochs", "0"]
    assert _run(common + ["--out", str(tmp_path / "a")]) == 0
    assert _run(common + ["--train-extra", str(extra), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / k / "fit.json").read_text()) for k in "ab")
    assert (b["n_in"], b["n_out"]) == (a["n_in"] + 1, a["n_out"] + 1) and a["fingerprint"] == b["fingerprint"]


def test_the_behavioural_stage_learns_at_the_given_rate(tmp_path, smollm2):
    """``--behavioural-lr`` reaches the behavioural stage (the same calibrator, fine-tuned at two rates, ends
    different) and ``fit.json``."""
    common = ["fit", "--model", "smollm2-135m", "--method", "crvlm", "--in-scope", "biology", "--layers", "8",
              "--n-train", "2", "--epochs", "1", "--width", "16", "--behavioural-epochs", "1"]
    assert _run(common + ["--behavioural-lr", "1e-6", "--out", str(tmp_path / "a")]) == 0
    assert _run(common + ["--behavioural-lr", "1e-2", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / k / "fit.json").read_text()) for k in "ab")
    assert (a["behavioural_lr"], b["behavioural_lr"]) == (1e-6, 1e-2)
    tensors = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert tensors and any((tmp_path / "a" / t).read_bytes() != (tmp_path / "b" / t).read_bytes() for t in tensors)


def test_cli_bad_inputs(tmp_path, smollm2, capsys):
    with pytest.raises(SystemExit):  # argparse rejects an unknown method
        main(["fit", "--method", "telepathy", "--in-scope", "biology", "--out", str(tmp_path)])
    assert _run(["fit", "--model", "smollm2-135m", "--in-scope", "biology", "--layers", "99", "--n-train", "2",
                 "--out", str(tmp_path / "a")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert _run(["fit", "--model", "smollm2-135m", "--in-scope", "cooking", "--out", str(tmp_path / "b")]) == 2
    assert "cooking" in capsys.readouterr().err
    assert _run(["fit", "--in-scope", " ", "--out", str(tmp_path / "c")]) == 2
    assert "empty scope" in capsys.readouterr().err
    assert _run(["eval", "--artifact", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert "not a `crvlm fit` output" in capsys.readouterr().err


def test_artifact_on_a_model_of_another_size_is_a_clear_error(tmp_path, smollm2):
    import torch

    from crvlm_core.vectors.steering_vector import SteeringVector

    art = tmp_path / "qwen-sized"
    SteeringVector(torch.zeros(24, 896), "teacher-forced", [8], model_spec="qwen2.5-0.5b").save(art)
    (art / "fit.json").write_text(json.dumps({"model": "qwen2.5-0.5b", "in_scope": ["biology"]}))
    assert _run(["eval", "--artifact", str(art), "--model", "smollm2-135m", "--n-test", "1", "--out",
                 str(tmp_path / "e")]) == 2


def test_parse_layers():
    assert parse_layers("8") == [8] and parse_layers("6-8") == [6, 7, 8] and parse_layers("1,3-4") == [1, 3, 4]
    assert parse_layers(None) is None
    with pytest.raises(InputError, match="bad --layers"):
        parse_layers("a-b")
    with pytest.raises(InputError, match="numbered from 0"):  # never wraps to the last layer
        parse_layers("-1")


def test_eval_defaults_to_the_artifacts_training_data(tmp_path):
    """An image dataset fitted on is evaluated on, with its images, when --test is not given."""
    art, ev = tmp_path / "art", tmp_path / "eval"
    assert _run(["fit", "--model", "tiny-llava", "--method", "mean-diff", "--train", "mm_subjects",
                 "--in-scope", "biology", "--layers", "1", "--n-train", "2", "--out", str(art)]) == 0
    assert _run(["eval", "--artifact", str(art), "--n-test", "1", "--max-new-tokens", "2", "--judge", "keyword",
                 "--out", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["test"] == "mm_subjects"
    rows = [json.loads(l) for l in (ev / "samples.jsonl").read_text().splitlines()]
    assert {r["id"].split("-")[0] for r in rows} == {"mm"} and len(rows) == 2
