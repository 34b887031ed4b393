"""Capability retention (issue #21 item 5): the question sets are fixed and held out, the multiple-choice scoring goes
through the steered forward (interventions, system prompts, another model), intervals and the paired difference, the
cache, `crvlm eval --capability` on a tiny random model, and a model that knows MMLU well above chance (slow)."""

import json
from collections import Counter

import pytest
import torch

from crvlm_core.capability import (LETTERS, QuestionSets, capability, capability_questions, choice_predictions,
                                   general_questions, in_scope_questions, letter_ids, mc_prompt)
from crvlm_core.cli.inputs import scoped_data
from crvlm_core.cli.main import main
from crvlm_core.core.errors import InputError
from crvlm_core.data.bundled import load_dataset
from crvlm_core.data.splits import assign_scope, split
from crvlm_core.metrics import bootstrap_ci, paired_difference_ci
from crvlm_core.models.loading import load_model
from crvlm_core.steer.interventions import AddVector

#: The first general questions, pinned: the set is the same on every run, for every scope and seed.
GENERAL_FIRST = ["mmlu-astronomy-0103", "mmlu-biology-0015", "mmlu-chemistry-0190", "mmlu-geography-0166",
                 "mmlu-mathematics-0145", "mmlu-physics-0032"]
SET_KEYS = {"n", "accuracy_steered", "accuracy_unsteered", "accuracy_steered_ci", "accuracy_unsteered_ci",
            "difference", "difference_ci", "letter_mass_steered", "letter_mass_unsteered"}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


def test_general_set_is_fixed_and_spans_subjects():
    ids = [q.id for q in general_questions(60)]
    assert ids[:6] == GENERAL_FIRST  # one question per subject, subjects in turn
    assert [q.id for q in general_questions(6)] == GENERAL_FIRST  # a smaller n is a prefix
    assert len(set(ids)) == 60 and {i.split("-")[1] for i in ids[:6]} == {i.split("-")[1] for i in ids}


def test_in_scope_set_is_held_out_from_the_fits_training_questions():
    held = in_scope_questions(["biology"], 100, seed=42)
    assert len(held) == 100 and {q.subject for q in held} == {"biology"}
    # crvlm fit's train half (the CLI) and the notebooks' split(n_train=100) draw from the same seeded shuffle
    cli_train = scoped_data("mmlu", ["biology"], [], "train", None, 42, "fit")
    nb_train, _ = split(assign_scope(load_dataset("mmlu"), in_scope=["biology"]), n_train=100, n_test=50, seed=42)
    assert not {q.id for q in held} & {s.id for s in cli_train + nb_train}
    # the in-scope questions crvlm eval scores (its test half, first n) are the first of them
    cli_test = [s for s in scoped_data("mmlu", ["biology"], [], "test", 50, 42, "eval") if s.scope == "in"]
    assert [s.id for s in cli_test] == [q.id for q in held[:50]]
    assert in_scope_questions(["biology"], 100, seed=7) != held  # the eval's seed picks the split


def test_questions_check_data_and_scope():
    with pytest.raises(InputError, match="none of the in-scope subjects"):
        capability_questions(["cooking"])
    with pytest.raises(InputError, match="choose from"):
        capability_questions(["biology"], dataset="mm_subjects")
    assert {q.subject for q in in_scope_questions(["biology", "cooking"], 5)} == {"biology"}  # unknown ones left out


def test_prompt_and_letter_ids(tiny):
    q = general_questions(1)[0]
    lines = mc_prompt(q).splitlines()
    assert lines[0] == q.prompt and lines[-1] == "Answer with the letter."
    assert lines[1:5] == [f"{letter}. {text}" for letter, text in zip(LETTERS, q.extra["choices"])]
    ids = letter_ids(tiny)
    tok = tiny.tokenizer
    for letter in LETTERS:
        assert tok.encode(letter, add_special_tokens=False)[0] in ids[letter]
        assert tok.encode(" " + letter, add_special_tokens=False)[0] in ids[letter]
        assert all(tok.decode([i]).strip() == letter for i in ids[letter])  # no lower-case "a" (the article)


def test_paired_difference_interval():
    assert paired_difference_ci([1, 0, 1, 1], [1, 0, 1, 1]) == (0.0, 0.0)
    assert paired_difference_ci([1] * 8, [0] * 8) == (1.0, 1.0)
    low, high = paired_difference_ci([1, 1, 0, 1, 0, 1, 1, 0] * 5, [1, 0, 0, 1, 0, 0, 1, 0] * 5)
    assert low <= 0.25 <= high and high - low < 0.5
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_ci([1, 0], [1])


def test_capability_plumbing_on_a_tiny_model(tiny, tmp_path):
    res = capability(tiny, ["biology"], sets=QuestionSets(6), cache_dir=tmp_path)
    assert res["dataset"] == "mmlu" and res["n"] == 6 and SET_KEYS <= set(res) and SET_KEYS <= set(res["general"])
    assert res["general"]["ids"] == GENERAL_FIRST and res["subjects"] == ["biology"]
    for part in (res, res["general"], *res["general"]["by_scope"].values()):
        assert 0.0 <= part["accuracy_steered"] <= 1.0 and 0.0 <= part["accuracy_unsteered"] <= 1.0
        low, high = part["accuracy_steered_ci"]
        assert low <= part["accuracy_steered"] <= high
    by_scope = res["general"]["by_scope"]
    assert (by_scope["in"]["n"], by_scope["out"]["n"]) == (1, 5)  # biology in, the other five subjects out
    assert capability(tiny, ["biology"], sets=QuestionSets(6), cache_dir=tmp_path) == res  # same on a second run
    # an explicit out-scope: subjects in neither scope count in neither part
    scoped = capability(tiny, ["biology"], ["physics"], sets=QuestionSets(6), cache_dir=tmp_path)
    scoped = scoped["general"]["by_scope"]
    assert (scoped["in"]["n"], scoped["out"]["n"]) == (1, 1)


def test_steered_scoring_goes_through_interventions_and_system_prompts(tiny, tmp_path):
    qs = general_questions(6)
    zero = AddVector(torch.zeros(tiny.n_layers, tiny.hidden_size), (1,), 1.0)
    plain = choice_predictions(tiny, qs, cache_dir=tmp_path)
    assert choice_predictions(tiny, qs, [zero], cache_dir=tmp_path) == plain  # computed again: a no-op steers nothing
    assert len(list(tmp_path.glob("capability-*.json"))) == 2
    strong = AddVector(torch.randn(tiny.n_layers, tiny.hidden_size, generator=torch.Generator().manual_seed(0)) * 50,
                       (1,), 1.0)
    steered = choice_predictions(tiny, qs, [strong])
    assert [r["letter_mass"] for r in steered] != [r["letter_mass"] for r in plain]
    prompted = choice_predictions(tiny, qs, system="Answer only questions about cooking.")
    assert [r["letter_mass"] for r in prompted] != [r["letter_mass"] for r in plain]
    res = capability(tiny, ["biology"], sets=QuestionSets(4), interventions=[zero])
    assert res["accuracy_steered"] == res["accuracy_unsteered"] and res["difference_ci"] == [0.0, 0.0]


def test_cli_eval_writes_capability(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CRVLM_OUTPUTS", str(tmp_path / "outputs"))  # the CLI caches in outputs/cache
    argv = ["eval", "--model", "tiny-llava", "--in-scope", "biology", "--test", "mmlu", "--n-test", "1",
            "--max-new-tokens", "1", "--judge", "keyword", "--capability", "mmlu", "--capability-n", "3",
            "--out", str(tmp_path / "ev")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    cap = json.loads((tmp_path / "ev" / "metrics.json").read_text())["capability"]
    assert (cap["dataset"], cap["n"], cap["general"]["n"]) == ("mmlu", 3, 3)
    assert cap["accuracy_steered"] == cap["accuracy_unsteered"]  # no artifact: the model itself
    assert "mmlu accuracy steered / unsteered" in capsys.readouterr().out
    assert list((tmp_path / "outputs" / "cache").glob("capability-*.json"))


@pytest.mark.slow
def test_a_model_that_knows_mmlu_scores_well_above_chance():
    """The scoring reads what a model knows: Qwen2.5-Coder-1.5B unsteered on the 100 held-out biology questions gets
    about 0.47; the 95 % interval must lie above chance (0.25) and it must beat always answering the most common
    letter. (The default 0.5B is near chance on MMLU — 0.29 [0.20, 0.39] on these questions, docs/results.md — so
    it cannot show this; a scoring bug, e.g. letters misread or the prompt's options lost, would fail here.)"""
    questions = in_scope_questions(["biology"], 100)
    correct = [r["correct"] for r in choice_predictions(load_model("qwen2.5-1.5b"), questions)]
    accuracy, (low, _) = sum(correct) / len(correct), bootstrap_ci(correct)
    most_common = max(Counter(q.extra["answer"] for q in questions).values()) / len(questions)
    assert low > 0.25 and accuracy > most_common, (accuracy, low, most_common)
