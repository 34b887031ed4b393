"""Tests for crvlm_core.data (schema, bundled, splits): line-numbered errors, scopes, seeded splits, bundled datasets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from crvlm_core.core.errors import InputError
from crvlm_core.data.bundled import list_datasets, load_dataset
from crvlm_core.data.schema import DataError, Sample, fingerprint, read_jsonl
from crvlm_core.data.splits import assign_scope, scope_dataset, split


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rec(i: int, subject: str = "biology", **kw) -> dict:
    return {"id": f"s{i}", "prompt": f"question {i}?", "subject": subject, **kw}


def make_samples(n_in: int, n_out: int) -> list[Sample]:
    ins = [Sample(f"in{i:03d}", f"p{i}", "biology") for i in range(n_in)]
    outs = [Sample(f"out{i:03d}", f"q{i}", "history") for i in range(n_out)]
    return ins + outs


# --- read_jsonl errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ("{not json", r"invalid JSON"),
        (json.dumps({"id": "x", "subject": "biology"}), r"`prompt` is missing"),
        (json.dumps({"id": "x", "prompt": "  ", "subject": "biology"}), r"`prompt` is empty"),
        (json.dumps({"id": "x", "prompt": "q?"}), r"`subject` is missing"),
        (json.dumps({"id": "x", "prompt": "q?", "subject": "b", "scope": "inside"}), r"`scope` must be"),
        (json.dumps(["a", "list"]), r"expected a JSON object"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, pattern):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1), "", bad])  # blank line 2; bad record on line 3
    with pytest.raises(DataError, match=pattern) as err:
        read_jsonl(path)
    assert "d.jsonl:3" in str(err.value)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1), rec(2), rec(1)])
    with pytest.raises(DataError, match=r"d\.jsonl:3: duplicate id 's1' \(first seen on line 1\)"):
        read_jsonl(path)


def test_missing_image(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1, image="images/nope.png")])
    with pytest.raises(DataError, match=r"d\.jsonl:1: image file does not exist"):
        read_jsonl(path)


def test_unreadable_image(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"\x00not a png at all" * 10)
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1), rec(2, image="garbage.png")])
    with pytest.raises(DataError, match=r"d\.jsonl:2: image cannot be opened"):
        read_jsonl(path)


def test_missing_id_is_generated_and_extra_kept(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "q?", "subject": "b", "answer": "A"}])
    (s,) = read_jsonl(path)
    assert s.id == "mine-1" and s.extra == {"answer": "A"} and s.scope is None and s.image is None


def test_user_jsonl_with_relative_image(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "imgs" / "red.png")
    path = write_jsonl(tmp_path / "user.jsonl", [rec(1, image="imgs/red.png", scope="in"), rec(2, "history")])
    samples = load_dataset(str(path))
    assert samples[0].image == (tmp_path / "imgs" / "red.png").resolve() and samples[0].image.is_absolute()
    img = samples[0].load_image()
    assert img.mode == "RGB" and img.size == (64, 64) and img.getpixel((0, 0)) == (200, 10, 10)
    assert samples[1].load_image() is None


def test_load_image_error_after_file_corrupted(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (s,) = read_jsonl(write_jsonl(tmp_path / "d.jsonl", [rec(1, image="a.png")]))
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read image"):
        s.load_image()


def test_load_dataset_unknown_name_and_subject(tmp_path):
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("no_such_dataset")
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1), rec(2, "history")])
    with pytest.raises(DataError, match=r"unknown subject\(s\) \['physics'\]; available: \['biology', 'history'\]"):
        load_dataset(path, subjects=["physics"])


def test_limit_per_subject_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [rec(i, "ab"[i % 2]) for i in range(40)])
    a = load_dataset(path, limit_per_subject=5, seed=1)
    assert Counter(s.subject for s in a) == {"a": 5, "b": 5}
    assert [s.id for s in a] == [s.id for s in load_dataset(path, limit_per_subject=5, seed=1)]
    assert [s.id for s in a] != [s.id for s in load_dataset(path, limit_per_subject=5, seed=2)]
    assert [s.subject for s in load_dataset(path, subjects=["b"])] == ["b"] * 20


# --- assign_scope ----------------------------------------------------------------------------


def test_assign_scope_default_and_explicit_out():
    samples = make_samples(3, 3) + [Sample("m1", "x", "maths"), Sample("k1", "y", "maths", scope="in")]
    scoped = assign_scope(samples, ["biology"])
    assert Counter(s.scope for s in scoped) == {"in": 4, "out": 4}
    assert samples[0].scope is None  # originals untouched
    scoped = assign_scope(samples, ["biology"], out_scope=["history"])
    assert [s.id for s in scoped if s.subject == "maths"] == ["k1"]  # pre-scoped kept, others dropped
    assert Counter(s.scope for s in scoped) == {"in": 4, "out": 3}


def test_assign_scope_errors():
    samples = make_samples(3, 3)
    with pytest.raises(DataError, match=r"unknown subject\(s\) \['physics'\]"):
        assign_scope(samples, ["physics"])
    with pytest.raises(DataError, match=r"unknown subject\(s\) \['chem'\]"):
        assign_scope(samples, ["biology"], out_scope=["chem"])
    with pytest.raises(DataError, match="empty split"):
        assign_scope(samples, ["biology", "history"])
    with pytest.raises(DataError, match="empty split"):
        assign_scope(samples, [], out_scope=["history"])


# --- split -----------------------------------------------------------------------------------


def ids(xs):
    return [s.id for s in xs]


def test_split_stratified_exact_counts_and_deterministic():
    samples = assign_scope(make_samples(30, 50), ["biology"])
    train, test = split(samples, n_train=10, n_test=12, seed=7)
    assert Counter(s.scope for s in train) == {"in": 10, "out": 10}
    assert Counter(s.scope for s in test) == {"in": 12, "out": 12}
    assert not set(ids(train)) & set(ids(test))
    again = split(list(reversed(samples)), n_train=10, n_test=12, seed=7)  # input order irrelevant
    assert (ids(train), ids(test)) == (ids(again[0]), ids(again[1]))
    other = split(samples, n_train=10, n_test=12, seed=8)
    assert ids(train) != ids(other[0])


def test_split_fraction_and_subject_strata():
    samples = assign_scope(make_samples(10, 20), ["biology"])
    train, test = split(samples, test_fraction=0.3)
    assert Counter(s.scope for s in test) == {"in": 3, "out": 6}
    assert len(train) + len(test) == 30
    train, test = split(samples, n_test=4, stratify_by="subject")
    assert Counter(s.subject for s in train) == {"biology": 6, "history": 16}


def test_split_errors():
    samples = assign_scope(make_samples(5, 50), ["biology"])
    with pytest.raises(DataError, match=r"stratum scope='in' has 5 sample\(s\), too few"):
        split(samples, n_train=4, n_test=4)
    with pytest.raises(DataError, match="call assign_scope first"):
        split(make_samples(5, 5))
    with pytest.raises(DataError, match="no samples"):
        split([])
    with pytest.raises(DataError, match="need at least 2"):
        split(assign_scope(make_samples(1, 5), ["biology"]))


def test_split_independent_of_hash_seed(tmp_path):
    code = (
        "from crvlm_core.data.schema import Sample\nfrom crvlm_core.data.splits import assign_scope, split\n"
        "s = [Sample(f'x{i}', 'p', 'ab'[i % 2]) for i in range(40)]\n"
        "tr, te = split(assign_scope(s, ['a']), n_train=5, n_test=5, seed=3)\n"
        "print(','.join(x.id for x in tr + te))\n"
    )
    root = Path(__file__).resolve().parents[1]
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(root)}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


# --- fingerprint -----------------------------------------------------------------------------


def test_fingerprint_tracks_prompt_and_image_bytes(tmp_path):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "d.jsonl", [rec(1, image="a.png"), rec(2)])
    fp = fingerprint(read_jsonl(path))
    assert len(fp) == 16 and fp == fingerprint(read_jsonl(path))
    write_jsonl(path, [rec(1, image="a.png"), {**rec(2), "prompt": "changed?"}])
    fp2 = fingerprint(read_jsonl(path))
    assert fp2 != fp
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "a.png")
    assert fingerprint(read_jsonl(path)) != fp2
    samples = read_jsonl(path)
    assert fingerprint([dataclasses.replace(s, scope="in") for s in samples]) != fingerprint(samples)


# --- bundled datasets ------------------------------------------------------------------------

MINIMUMS = {
    "mmlu": {s: 140 for s in ("biology", "physics", "chemistry", "mathematics", "geography", "astronomy")},
    "harmful": {"harmful": 600},
    "overrefusal": {"benign_edgy": 150},
    "political": {"political": 60, "neutral": 60},
    "political_wide": {"political": 150, "neutral": 150},
    "refusal_labels": {"refused": 1, "not_refused": 1},
    "eval_answer_labels": {"refused": 150, "not_refused": 170},
    "harmful_benign_pairs": {"harmful": 150, "harmless": 150},
    "mm_subjects": {"biology": 8, "astronomy": 8, "geography": 8, "chemistry": 5},
    "images": {"animal": 80, "plant": 35, "food": 80, "flag": 80},
    "images_test": {"animal": 40, "plant": 40, "food": 40, "flag": 40},
    "plain_questions": {"biology": 50, "physics": 50, "geography": 50, "chemistry": 40, "astronomy": 40,
                        "mathematics": 40},
    "plain_questions_train": {"biology": 200, "physics": 200, "geography": 200, "chemistry": 200, "astronomy": 200,
                              "mathematics": 200, **{s: 35 for s in ("history", "literature", "music", "sport",
                                                                    "cooking", "computing", "economics", "art")}},
}


def test_bundled_names():
    assert set(MINIMUMS) <= set(list_datasets())


@pytest.mark.parametrize("name", sorted(MINIMUMS))
def test_bundled_dataset_counts(name):
    samples = load_dataset(name)
    counts = Counter(s.subject for s in samples)
    for subject, minimum in MINIMUMS[name].items():
        assert counts[subject] >= minimum, (name, subject, counts[subject])


def test_eval_answer_labels_are_answers_to_bundled_questions():
    """The engineer's labels of crvlm eval answers: each row's prompt is the MMLU question it names, its label and
    subject agree, and no (question, answer) pair is labelled twice."""
    mmlu = {s.id: s.prompt for s in load_dataset("mmlu")}
    rows = load_dataset("eval_answer_labels")
    assert all(mmlu[r.extra["question_id"]] == r.prompt for r in rows)
    assert all(r.subject == ("refused" if r.extra["refused"] is True else "not_refused") for r in rows)
    assert len({(r.prompt, r.extra["response"]) for r in rows}) == len(rows) == 331


def test_bundled_fields():
    mmlu = load_dataset("mmlu", subjects=["biology"])
    assert {s.extra["mmlu_subject"] for s in mmlu} == {"high_school_biology", "college_biology"}
    assert all(len(s.extra["choices"]) == 4 and s.extra["answer"] in "ABCD" for s in mmlu)
    assert mmlu[0].id == "mmlu-biology-0001" and all(s.prompt != "question" for s in mmlu)
    harmful = load_dataset("harmful")
    assert Counter(s.extra["source"] for s in harmful) == {"advbench": 520, "harmbench": 200}
    labels = load_dataset("refusal_labels")
    assert len(labels) == 169 and all(isinstance(s.extra["refused"], bool) and s.extra["response"] for s in labels)
    pairs = Counter(s.extra["pair_id"] for s in load_dataset("harmful_benign_pairs"))
    assert len(pairs) == 150 and set(pairs.values()) == {2}
    assert all(s.extra["country"] for s in load_dataset("political"))


def test_political_wide_is_a_larger_disjoint_set_balanced_by_country():
    """#27's held-out political / neutral set: every item has a country and a topic, at least 30 countries, each
    country with political questions has neutral ones too, and no question repeats one of `political`."""
    samples = load_dataset("political_wide")
    counts = Counter(s.subject for s in samples)
    assert set(counts) == {"political", "neutral"} and min(counts.values()) >= 150
    assert len({s.id for s in samples}) == len(samples)
    assert all(s.extra.get("country") and s.extra.get("topic") for s in samples)
    countries = {subject: {s.extra["country"] for s in samples if s.subject == subject} for subject in counts}
    assert len(countries["political"] | countries["neutral"]) >= 30
    assert countries["political"] <= countries["neutral"]
    old = {s.prompt.strip().lower() for s in load_dataset("political")}
    assert not [s.id for s in samples if s.prompt.strip().lower() in old]


def test_mm_subjects_images_open_and_small():
    samples = load_dataset("mm_subjects")
    assert len(samples) >= 40 and len({s.subject for s in samples}) >= 4
    for s in samples:
        img = s.load_image()
        assert img.mode == "RGB" and max(img.size) <= 256
        assert s.extra["licence"] and s.extra["image_source"]
    digests = Counter(hashlib.sha256(s.image.read_bytes()).hexdigest() for s in samples)
    assert max(digests.values()) == 1, "two items share identical image bytes"


def test_bundled_size_small():
    root = Path(__file__).resolve().parents[1] / "crvlm_core" / "datasets"
    pictures = [p for p in (root / "images" / "pictures").rglob("*.png")]
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p not in pictures) < 3 * 1024 * 1024
    # the vision model's 435 pictures: 224-px 64-colour PNGs, about 11 KB each
    assert len(pictures) >= 400 and sum(p.stat().st_size for p in pictures) < 6 * 1024 * 1024


def test_scope_dataset_paper_sized_split():
    samples = scope_dataset(["biology"], "mmlu", out_scope=["physics", "chemistry"])
    assert {s.subject for s in samples if s.scope == "out"} == {"physics", "chemistry"}
    train, test = split(samples, n_train=200, n_test=200)
    assert Counter(s.scope for s in train) == Counter(s.scope for s in test) == {"in": 200, "out": 200}


def test_take_per_scope_is_a_prefix_of_a_larger_split():
    from crvlm_core.data.splits import take_per_scope

    samples = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    _, big = split(samples, n_train=10, n_test=6, seed=42)
    small = take_per_scope(big, 2)
    assert [s.scope for s in small].count("in") == 2 and [s.scope for s in small].count("out") == 2
    assert all(s in big for s in small)
    assert take_per_scope(big, 0) == []
    with pytest.raises(DataError):
        take_per_scope(big, -1)


def test_data_error_is_an_input_error():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)


# --- bad data files (#24): one line naming the file (and line) and what to do ---------------------


_FILE_CASES = [
    # (name, file bytes, message pattern, line named or None)
    ("empty", b"", r"empty file: expected one JSON object per line with a non-empty string `prompt`", None),
    ("blank-lines", b"\n   \n\t\n", r"no records \(only blank lines\): expected one JSON object per line", None),
    ("latin-1", json.dumps(rec(1)).encode() + b"\n" + '{"prompt": "caf\xe9", "subject": "b"}\n'.encode("latin-1"),
     r"not UTF-8 \(byte 0xe9 at column \d+\): save the file as UTF-8", 2),
    ("broken-json", json.dumps(rec(1)).encode() + b'\n{"prompt": "q?", "subject": \n', r"invalid JSON: .*expected one JSON", 2),
    ("not-an-object", b'"just a string"\n', r"expected a JSON object, got str", 1),
    ("number-row", b"42\n", r"expected a JSON object, got int", 1),
    ("no-prompt", json.dumps({"subject": "b"}).encode() + b"\n", r"`prompt` is missing: expected", 1),
    ("prompt-not-string", json.dumps({"prompt": 5, "subject": "b"}).encode() + b"\n",
     r"`prompt` is empty or not a string \(5\)", 1),
    ("prompt-a-list", json.dumps({"prompt": ["a"], "subject": "b"}).encode() + b"\n", r"`prompt` is empty or not a string", 1),
    ("deeply-nested", b"[" * 100000 + b"]" * 100000 + b"\n", r"(invalid JSON|expected a JSON object)", 1),
    ("missing-image", json.dumps(rec(1, image="nope.png")).encode() + b"\n",
     r"image file does not exist: .*nope\.png \(`image` is a path relative to the JSONL file's folder\)", 1),
    ("image-is-folder", json.dumps(rec(1, image=".")).encode() + b"\n", r"image file is a folder, not a file", 1),
    ("garbage-image", json.dumps(rec(1, image="garbage.png")).encode() + b"\n",
     r"image cannot be opened: .*garbage\.png .*give a readable PNG/JPEG file", 1),
]


@pytest.mark.parametrize("name, data, pattern, line", _FILE_CASES, ids=[c[0] for c in _FILE_CASES])
def test_bad_data_file_is_one_line_naming_file_and_line(tmp_path, name, data, pattern, line):
    (tmp_path / "garbage.png").write_bytes(b"\x00not a png" * 10)
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    for load in (read_jsonl, load_dataset):
        with pytest.raises(DataError, match=pattern) as err:
            load(path)
        msg = str(err.value)
        assert "\n" not in msg and err.value.__cause__ is None
        assert msg.startswith(f"{path}:{line}: " if line else f"{path}: "), msg


def test_empty_file_fails_at_the_file_not_at_the_subjects(tmp_path):
    """Before #24 an empty file ended as "unknown subject(s) ['biology']; available: []"."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"data\.jsonl: empty file"):
        load_dataset(path, subjects=["biology"])
    with pytest.raises(DataError, match=r"data\.jsonl: empty file"):
        scope_dataset(["biology"], dataset=str(path))


def test_missing_unreadable_and_folder_data_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file: give a JSONL file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"no such file \(it is a folder\)"):
        read_jsonl(tmp_path)
    path = write_jsonl(tmp_path / "locked.jsonl", [rec(1)])
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: the file stays readable")
        with pytest.raises(DataError, match=r"locked\.jsonl: cannot read the file .*check its permissions"):
            read_jsonl(path)
    finally:
        path.chmod(0o644)


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec(1)).encode() + b"\r\n" + json.dumps(rec(2)).encode() + b"\r\n")
    assert [s.id for s in read_jsonl(path)] == ["s1", "s2"]


# --- the prompt-length limit (#24) -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_handle():
    from types import SimpleNamespace

    from crvlm_core.models.tiny_vlms import _tiny_tokenizer

    tok = _tiny_tokenizer()

    def format_prompt(prompt, system=None, assistant_prefix=None, has_image=False):
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)

    config = SimpleNamespace(max_position_embeddings=512)
    return SimpleNamespace(tokenizer=tok, format_prompt=format_prompt, hf_model=SimpleNamespace(config=config))


def test_prompt_length_default_is_the_models_context(tiny_handle):
    from crvlm_core.data.limits import PromptTooLong, check_prompt_lengths, context_length

    assert context_length(tiny_handle) == 512
    counts = check_prompt_lengths(tiny_handle, [Sample("a", "What is a cell?", "biology")])
    template = len(tiny_handle.tokenizer(tiny_handle.format_prompt("x"), add_special_tokens=False)["input_ids"])
    assert counts[0] > len(tiny_handle.tokenizer("What is a cell?")["input_ids"]) and counts[0] >= template
    long = Sample("long-1", "word " * 600, "biology")
    with pytest.raises(PromptTooLong, match=r"sample 'long-1' \(train\.jsonl\): prompt has \d+ tokens "
                                            r"\(chat-formatted\); the model's context is 512 tokens: shorten it "
                                            r"or pass --max-prompt-tokens") as err:
        check_prompt_lengths(tiny_handle, [Sample("ok", "hi", "b"), long], source="train.jsonl")
    assert isinstance(err.value, InputError) and "\n" not in str(err.value)


def test_prompt_length_explicit_limit_and_bad_limits(tiny_handle):
    from crvlm_core.data.limits import PromptTooLong, check_prompt_lengths

    sample = Sample("q", "word " * 30, "biology")
    (n,) = check_prompt_lengths(tiny_handle, [sample], limit=1000)
    assert check_prompt_lengths(tiny_handle, [sample], limit=n) == [n]  # exactly the limit passes
    with pytest.raises(PromptTooLong, match=rf"sample 'q': prompt has {n} tokens .*the limit is {n - 1} tokens"):
        check_prompt_lengths(tiny_handle, [sample], limit=n - 1)
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(DataError, match="positive integer"):
            check_prompt_lengths(tiny_handle, [sample], limit=bad)
    assert check_prompt_lengths(tiny_handle, ["plain prompt"], limit=100)[0] > 0  # plain strings work too


def test_huge_prompt_refused_fast_without_tokenising(tiny_handle, monkeypatch):
    import time
    import tracemalloc

    from crvlm_core.data import limits

    def no_tokenising(*a, **k):
        raise AssertionError("a 10 MB prompt must not be tokenised")

    monkeypatch.setattr(limits, "_count_tokens", no_tokenising)
    huge = Sample("huge", "x" * 10_000_000, "biology")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(limits.PromptTooLong, match=r"sample 'huge': prompt has at least \d+ tokens "
                                                       r"\(10000000 characters\); the limit is 8192 tokens"):
            limits.check_prompt_lengths(tiny_handle, [huge], limit=8192)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 200 * 2**20


def test_prompt_length_unknown_context_checks_nothing():
    from types import SimpleNamespace

    from crvlm_core.data.limits import check_prompt_lengths, context_length

    tok = SimpleNamespace(model_max_length=int(1e30))
    handle = SimpleNamespace(tokenizer=tok)
    assert context_length(handle) is None and check_prompt_lengths(handle, ["anything"]) == []


def test_prompt_length_on_the_tiny_llava_handle():
    """A real (random-weight) VLM handle: the context comes from its text config, the chat template and the image
    placeholder are counted."""
    from crvlm_core.data.limits import PromptTooLong, check_prompt_lengths, context_length
    from crvlm_core.models.loading import load_model

    handle = load_model("tiny-llava")
    assert context_length(handle) == handle.hf_model.config.get_text_config().max_position_embeddings == 512
    plain, with_image = check_prompt_lengths(handle, [Sample("a", "hi", "b"),
                                                      Sample("b", "hi", "b", image=Path("unused.png"))])
    assert with_image > plain > 1
    with pytest.raises(PromptTooLong, match=r"sample 'long' \(mine\.jsonl\): prompt has \d+ tokens .*context is 512"):
        check_prompt_lengths(handle, [Sample("long", "word " * 600, "b")], source="mine.jsonl")


# --- framing (#25) ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["plain_questions", "plain_questions_train"])
def test_plain_questions_never_name_a_subject_or_a_framing(name):
    from crvlm_core.data.framing import SUBJECT_WORDS

    words = ("biology", "physics", "geography", "chemistry", "astronomy", "mathematics", "student", "teacher")
    samples = load_dataset(name)
    assert all(s.prompt.endswith("?") and not any(w in s.prompt.lower() for w in words) for s in samples)
    assert len({s.prompt for s in samples}) == len(samples) and {s.subject for s in samples} <= set(SUBJECT_WORDS)
    if name == "plain_questions_train":  # training only: nothing of the test set
        assert not {s.prompt.lower() for s in samples} & {s.prompt.lower() for s in load_dataset("plain_questions")}
        assert not any(w in s.prompt.lower() for s in samples for w in ("history", "music", "cooking", "economics"))


def test_plain_questions_train_paraphrases_no_test_question():
    """The in-style training questions may cover a test question's topic, never its wording: content-word Jaccard
    similarity of every train–test pair is at most 0.5 (the few pairs at 0.5 are short arithmetic questions)."""
    import re

    stop = set("the a an of to in on and or is are was were be been what which why how does do did that this these "
               "those with for from by as at it its into than then there their they can could would should will when "
               "where who whom whose about between during after before over under most more many much some any each "
               "one two not no you your our we us i if so such also have has had".split())

    def words(text):
        return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in stop}

    test = [words(s.prompt) for s in load_dataset("plain_questions")]
    worst = max((len(a & b) / len(a | b), s.id) for s in load_dataset("plain_questions_train")
                for a in [words(s.prompt)] for b in test)
    assert worst[0] <= 0.5, f"{worst[1]} is too close to a test question"


def test_framing_templates_train_and_test_are_disjoint_with_the_same_styles():
    from crvlm_core.data.framing import FRAME_STYLES, TEST_TEMPLATES, TRAIN_TEMPLATES

    assert set(TEST_TEMPLATES) == set(TRAIN_TEMPLATES) == set(FRAME_STYLES)
    test = {t for ts in TEST_TEMPLATES.values() for t in ts}
    train = {t for ts in TRAIN_TEMPLATES.values() for t in ts}
    assert not test & train and all("{q}" in t for t in test | train)


def test_framing_test_dresses_each_question_as_the_wrong_side():
    from crvlm_core.data.framing import TEST_TEMPLATES, framing_augment, framing_test

    plain = assign_scope(load_dataset("plain_questions"), in_scope=["biology"])
    framed = framing_test(plain, ["biology"], seed=0)
    assert [f.extra["base_id"] for f in framed] == [s.id for s in plain]
    assert all(f.scope == s.scope and f.subject == s.subject and s.prompt in f.prompt for f, s in zip(framed, plain))
    assert all((f.extra["frame"] == "biology") == (f.scope == "out") for f in framed)
    assert {f.extra["style"] for f in framed} == set(TEST_TEMPLATES)
    assert framing_test(plain, ["biology"], seed=0) == framed != framing_test(plain, ["biology"], seed=1)
    test_wording = {t for ts in TEST_TEMPLATES.values() for t in ts}
    assert not {f.extra["template"] for f in framing_augment(plain, ["biology"])} & test_wording


def test_framing_parts_split_the_plain_questions_into_disjoint_halves_each_plain_and_framed():
    from crvlm_core.data.framing import framing_parts

    parts = framing_parts(["physics"])
    dev, held = parts["dev"], parts["held-out"]
    assert not {s.id for s in dev["plain"]} & {s.id for s in held["plain"]}
    assert len(dev["plain"]) + len(held["plain"]) == len(load_dataset("plain_questions"))
    for part in (dev, held):
        assert [f.extra["base_id"] for f in part["framed"]] == [s.id for s in part["plain"]]
        assert all((f.extra["frame"] == "physics") == (f.scope == "out") for f in part["framed"])
    assert framing_parts(["physics"]) == parts
