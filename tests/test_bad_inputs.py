"""Issue #24: every bad input and fault of `crvlm fit` / `crvlm eval` gets ONE line on stderr naming the option or
file, exit 2 (130 for Ctrl-C), no traceback, and nothing left in --out. One table, run in-process on tiny-llava."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from crvlm_core.cli.main import main

TINY = ["--model", "tiny-llava"]
FIT = ["fit", "--in-scope", "biology", "--out", "{out}"]  # options only: the run stops before the model loads
EVAL = ["eval", "--model", "tiny-llava", "--in-scope", "biology", "--out", "{out}"]
FIT_TINY = ["fit", *TINY, "--method", "mean-diff", "--train", "mm_subjects", "--in-scope", "biology",
            "--n-train", "2", "--out", "{out}"]
POLICY = str(Path(__file__).resolve().parent.parent / "examples" / "policy_bio_physics_harmful.yaml")
JUDGE = ["judge", "--input", "{tmp}/in.jsonl", "--judge", "keyword", "--out", "{out}"]
EVAL_ART = ["eval", "--artifact", "{art}", "--n-test", "1", "--max-new-tokens", "2", "--judge", "keyword",
            "--out", "{out}"]


# -- setups: write files into the test's folder (tmp) or damage its copy of a fitted artifact (art) ---------------
def _write(name: str, data: bytes | str):
    def setup(tmp: Path, art: Path, monkeypatch) -> None:
        (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def _both(*setups):
    def setup(tmp: Path, art: Path, monkeypatch) -> None:
        for one in setups:
            one(tmp, art, monkeypatch)
    return setup


def _jsonl(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _rehash(art: Path) -> None:
    """Make artifact.json agree with the files again (a consistent manifest over damaged files)."""
    manifest = json.loads((art / "artifact.json").read_text())
    manifest["files"] = {n: hashlib.sha256((art / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (art / "artifact.json").write_text(json.dumps(manifest))


def _damage(name: str, data: bytes | str | None, rehash: bool = False):
    def setup(tmp: Path, art: Path, monkeypatch) -> None:
        if data is None:
            (art / name).unlink()
        else:
            path = art / name
            new = data(path.read_bytes()) if callable(data) else data
            path.write_bytes(new.encode() if isinstance(new, str) else new)
        if rehash:
            _rehash(art)
    return setup


def _other_model(tmp: Path, art: Path, monkeypatch) -> None:
    manifest = json.loads((art / "artifact.json").read_text())
    manifest["model"].update(spec="qwen2.5-0.5b", hidden_size=896, n_layers=24)
    (art / "artifact.json").write_text(json.dumps(manifest))


def _old_format(tmp: Path, art: Path, monkeypatch) -> None:
    for p in art.iterdir():
        if p.name != "fit.json":
            p.unlink()


def _out_file(tmp: Path, art: Path, monkeypatch) -> None:
    (tmp / "out").write_text("my notes, not an output folder\n")


def _out_not_empty(tmp: Path, art: Path, monkeypatch) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine\n")


def _damaged_judge_model(tmp: Path, art: Path, monkeypatch) -> None:
    """A converted judge model in a fresh cache whose weights file is cut in half (smollm2: a small stand-in)."""
    from crvlm_core.models import embedded, loading

    real = embedded.embedded_model_folder("smollm2-135m")
    monkeypatch.setenv("CRVLM_CACHE", str(tmp / "cache"))
    monkeypatch.setattr(loading, "_CACHE", {})  # no handle loaded earlier in the session stands in for it
    target = tmp / "cache" / "models" / real.name
    shutil.copytree(real, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (tmp / "cache" / "gguf").mkdir(parents=True, exist_ok=True)
    gguf = embedded.smollm2_gguf_path()  # the stamp that names the folder, without hashing the GGUF again
    sha = real.name.rsplit("-", 1)[1]
    (tmp / "cache" / "gguf" / "smollm2.sha256").write_text(
        f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}\n{sha}\n")
    (tmp / "in.jsonl").write_text(_jsonl({"prompt": "q", "response": "a"}))


def _interrupt(chained: bool, where: str = "crvlm_core.evaluation.evaluate", out_holds_artifact: bool = False):
    """Ctrl-C during generation (or the fit at ``where``); ``chained``: as nnsight re-raises it (another error raised
    while handling it); ``out_holds_artifact``: --out is a fitted folder that --force would replace."""
    def setup(tmp: Path, art: Path, monkeypatch) -> None:
        if out_holds_artifact:
            shutil.copytree(art, tmp / "out")

        def interrupted(*a, **k):
            if not chained:
                raise KeyboardInterrupt
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("nnsight found no `with` statement ... the source is stale") from None
        monkeypatch.setattr(where, interrupted)
    return setup


_BIO = {"prompt": "What is a cell?", "subject": "biology"}
_HIST = {"prompt": "Who was Caesar?", "subject": "history"}
_LONG = _jsonl({**_BIO, "prompt": "cell " * 3000}, _HIST)


def row(rid: str, argv: list[str], *fragments: str, setup=None, code: int = 2):
    return pytest.param(argv, fragments, setup, code, id=rid)


ROWS = [
    # -- numbers: finite floats, positive counts (checked by argparse, before any data or model) ----------------
    row("fit-alpha-inf", [*FIT, "--alpha", "inf"], "--alpha", "finite"),
    row("fit-alpha-nan", [*FIT, "--alpha", "nan"], "--alpha", "finite"),
    row("eval-alpha-inf", [*EVAL, "--alpha", "inf"], "--alpha", "finite"),
    row("eval-alpha-word", [*EVAL, "--alpha", "strong"], "--alpha", "number"),
    row("fit-lr-nan", [*FIT, "--method", "crvlm", "--lr", "nan"], "--lr", "finite"),
    row("fit-lr-zero", [*FIT, "--method", "crvlm", "--lr", "0"], "--lr", "> 0"),
    row("fit-target-scale-inf", [*FIT, "--method", "crvlm", "--target-scale=-inf"], "--target-scale", "finite"),
    row("fit-ridge-lambda-inf", [*FIT, "--ridge-lambda", "inf"], "--ridge-lambda", "finite"),
    row("fit-tau-nan", [*FIT, "--tau", "nan"], "--tau", "finite"),
    row("fit-lora-lr-inf", [*FIT, "--lora-lr", "inf"], "--lora-lr", "finite"),
    row("fit-n-train-0", [*FIT, "--n-train", "0"], "--n-train", ">= 1"),
    row("fit-n-train-word", [*FIT, "--n-train", "many"], "--n-train", "integer"),
    row("eval-n-test-0", [*EVAL, "--n-test", "0"], "--n-test", ">= 1"),
    row("fit-epochs-0", [*FIT, "--method", "crvlm", "--epochs", "0"], "--epochs", ">= 1"),
    row("fit-width-0", [*FIT, "--method", "crvlm", "--width", "0"], "--width", ">= 1"),
    row("fit-behavioural-epochs-neg", [*FIT, "--behavioural-epochs", "-1"], "--behavioural-epochs", ">= 0"),
    row("fit-behavioural-lr-0", [*FIT, "--method", "crvlm", "--behavioural-lr", "0"], "--behavioural-lr", "> 0"),
    row("fit-batch-size-0", [*FIT, "--batch-size", "0"], "--batch-size", ">= 1"),
    row("eval-batch-size-neg", [*EVAL, "--batch-size", "-4"], "--batch-size", ">= 1"),
    row("eval-max-new-tokens-0", [*EVAL, "--max-new-tokens", "0"], "--max-new-tokens", ">= 1"),
    row("fit-lora-rank-0", [*FIT, "--lora-rank", "0"], "--lora-rank", ">= 1"),
    row("fit-k-0", [*FIT, "--k", "0"], "--k", ">= 1"),
    row("fit-max-prompt-tokens-0", [*FIT, "--max-prompt-tokens", "0"], "--max-prompt-tokens", ">= 1"),
    # -- layers and the gate layer ------------------------------------------------------------------------------
    row("fit-layers-negative", [*FIT, "--layers", "-1"], "--layers", "numbered from 0"),
    row("fit-layers-syntax", [*FIT, "--layers", "3-a"], "--layers", "N, A-B or A,B,C"),
    row("fit-layers-reversed", [*FIT, "--layers", "5-2"], "--layers", "N, A-B or A,B,C"),
    row("eval-layers-negative", [*EVAL, "--layers", "-2"], "--layers", "numbered from 0"),
    row("fit-condition-layers-syntax", [*FIT, "--condition-layers", "x"], "--condition-layers", "N, A-B"),
    row("fit-gate-layer-word", [*FIT, "--method", "crvlm", "--gate-layer", "abc"], "--gate-layer", "auto, none"),
    row("fit-gate-layer-negative", [*FIT, "--method", "crvlm", "--gate-layer", "-3"], "--gate-layer", "auto, none"),
    row("fit-layers-beyond-model", [*FIT_TINY, "--layers", "7"], "--layers", "out of range"),
    row("fit-gate-layer-beyond-model", [*FIT_TINY, "--method", "crvlm", "--gate-layer", "9"], "--gate-layer",
        "out of range"),
    row("eval-layers-beyond-model", [*EVAL_ART, "--layers", "0-5"], "--layers", "out of range"),
    # -- choices and required options -----------------------------------------------------------------------------
    row("fit-unknown-method", [*FIT, "--method", "telepathy"], "--method", "invalid choice"),
    row("fit-bad-split", [*FIT, "--split", "half"], "--split", "invalid choice"),
    row("fit-no-out", ["fit", "--in-scope", "biology"], "--out", "required"),
    row("fit-empty-scope", ["fit", "--in-scope", " ", "--out", "{out}"], "--in-scope", "empty scope"),
    row("eval-no-model", ["eval", "--in-scope", "biology", "--out", "{out}"], "--model", "--artifact"),
    row("eval-no-scope", ["eval", *TINY, "--out", "{out}"], "--in-scope", "needed"),
    row("eval-capability-unknown", [*EVAL, "--capability", "gsm8k"], "--capability", "invalid choice"),
    row("eval-capability-n-0", [*EVAL, "--capability", "mmlu", "--capability-n", "0"], "--capability-n", ">= 1"),
    row("eval-capability-policy", ["eval", *TINY, "--policy", POLICY, "--capability", "mmlu", "--out", "{out}"],
        "--capability", "policy"),
    row("eval-capability-scope-not-mmlu", [*EVAL, "--in-scope", "food", "--test", "mm_subjects", "--capability",
        "mmlu"], "--capability mmlu", "none of the in-scope subjects (food)", "mmlu"),
    row("fit-unknown-model", ["fit", "--model", "no-such-model", "--train", "mm_subjects", "--in-scope", "biology",
                              "--out", "{out}"], "no-such-model"),
    # -- subjects -------------------------------------------------------------------------------------------------
    row("fit-in-scope-unknown", [*FIT, "--in-scope", "cooking"], "--in-scope", "cooking", "available in mmlu"),
    row("fit-out-scope-unknown", [*FIT, "--out-scope", "knitting"], "--out-scope", "knitting"),
    row("eval-in-scope-unknown", [*EVAL, "--in-scope", "cooking", "--test", "mm_subjects"], "cooking",
        "mm_subjects"),
    # -- --out --------------------------------------------------------------------------------------------------
    row("fit-out-is-file", FIT, "out", "is a file", setup=_out_file),
    row("eval-out-is-file", EVAL, "out", "is a file", setup=_out_file),
    row("fit-out-not-empty", FIT, "out", "--force", setup=_out_not_empty),
    # -- data files (crvlm_core/data: the bad-data branch) ----------------------------------------------------------
    row("data-missing-file", [*FIT, "--train", "{tmp}/nothing.jsonl"], "nothing.jsonl"),
    row("eval-data-missing-file", [*EVAL, "--test", "{tmp}/nothing.jsonl"], "nothing.jsonl"),
    row("data-empty-file", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl", setup=_write("d.jsonl", "")),
    row("data-blank-lines", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl", setup=_write("d.jsonl", "\n  \n\t\n")),
    row("data-non-utf8", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl",
        setup=_write("d.jsonl", _jsonl(_BIO).encode() + b'{"prompt": "\xff\xfe", "subject": "history"}\n')),
    row("data-broken-json", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl:2", "JSON",
        setup=_write("d.jsonl", _jsonl(_BIO) + '{"prompt": "x", "subject": \n')),
    row("data-no-prompt", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl:2", "prompt",
        setup=_write("d.jsonl", _jsonl(_BIO, {"subject": "history"}))),
    row("data-unknown-subject", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl", "biology",
        setup=_write("d.jsonl", _jsonl(_HIST, {**_HIST, "prompt": "Who was Cicero?"}))),
    # -- pictures (#20): a missing or corrupt image, a picture for a text-only model, none where one is needed --------
    row("data-missing-image", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl:1", "image file does not exist",
        setup=_write("d.jsonl", _jsonl({**_BIO, "image": "nope.png"}, _HIST))),
    row("data-corrupt-image", [*FIT, "--train", "{tmp}/d.jsonl"], "d.jsonl:1", "image cannot be opened",
        setup=_both(_write("bad.png", b"\x00not a png" * 10), _write("d.jsonl", _jsonl({**_BIO, "image": "bad.png"},
                                                                                      _HIST)))),
    row("fit-pictures-on-text-model", ["fit", "--model", "smollm2-135m", "--method", "mean-diff", "--train", "images",
                                       "--in-scope", "animal", "--n-train", "2", "--out", "{out}"],
        "(images)", "text-only model"),
    row("eval-pictures-on-text-model", ["eval", "--model", "smollm2-135m", "--test", "images_test", "--in-scope",
                                        "animal", "--n-test", "1", "--out", "{out}"], "(images_test)", "text-only model"),
    row("eval-no-picture-for-instructblip", ["eval", "--model", "tiny-instructblip", "--test", "{tmp}/d.jsonl",
                                             "--in-scope", "biology", "--out", "{out}"],
        "d.jsonl", "cannot run without", setup=_write("d.jsonl", _jsonl(_BIO, _HIST))),
    row("data-prompt-beyond-context", [*FIT_TINY, "--train", "{tmp}/d.jsonl", "--split", "all"], "d.jsonl",
        "512 tokens", setup=_write("d.jsonl", _LONG)),
    row("data-prompt-beyond-limit", [*FIT_TINY, "--max-prompt-tokens", "3"], "mm_subjects", "limit is 3 tokens"),
    row("eval-prompt-beyond-limit", [*EVAL_ART, "--max-prompt-tokens", "3"], "mm_subjects", "limit is 3 tokens"),
    row("policy-fit-prompt-beyond-limit", ["fit", *TINY, "--policy", POLICY, "--max-prompt-tokens", "3", "--out",
        "{out}"], "policy_bio_physics_harmful.yaml", "limit is 3 tokens"),
    row("policy-eval-prompt-beyond-limit", ["eval", *TINY, "--policy", POLICY, "--max-prompt-tokens", "3",
        "--out", "{out}"], "policy_bio_physics_harmful.yaml", "limit is 3 tokens"),
    # -- artifact folders ---------------------------------------------------------------------------------------
    row("art-missing-folder", [*EVAL_ART[:2], "{tmp}/nowhere", *EVAL_ART[3:]], "nowhere", "does not exist"),
    row("art-is-a-file", [*EVAL_ART[:2], "{tmp}/notes.txt", *EVAL_ART[3:]], "notes.txt", "not a folder",
        setup=_write("notes.txt", "hello\n")),
    row("art-empty-folder", [*EVAL_ART[:2], "{tmp}", *EVAL_ART[3:]], "artifact.json", "not a `crvlm fit`"),
    row("art-old-format", EVAL_ART, "artifact.json", "re-fit", setup=_old_format),
    row("art-broken-manifest", EVAL_ART, "artifact.json", "not valid JSON",
        setup=_damage("artifact.json", '{"kind": "vector", ')),
    row("art-truncated-safetensors", EVAL_ART, "vector.safetensors", "damaged",
        setup=_damage("vector.safetensors", lambda b: b[: len(b) // 2])),
    row("art-random-safetensors", EVAL_ART, "vector.safetensors", "damaged",
        setup=_damage("vector.safetensors", bytes(range(256)) * 3)),
    row("art-missing-tensors", EVAL_ART, "vector.safetensors", "missing", setup=_damage("vector.safetensors", None)),
    row("art-truncated-safetensors-rehashed", EVAL_ART, "art", "re-fit",
        setup=_damage("vector.safetensors", lambda b: b[: len(b) // 2], rehash=True)),
    row("art-random-safetensors-rehashed", EVAL_ART, "art", "re-fit",
        setup=_damage("vector.safetensors", bytes(range(256)) * 3, rehash=True)),
    row("art-json-wrong-shape", EVAL_ART, "art", "re-fit", setup=_damage("vector.json", "[1, 2, 3]", rehash=True)),
    row("art-json-wrong-fields", EVAL_ART, "art", "re-fit",
        setup=_damage("vector.json", lambda b: json.dumps({**json.loads(b), "layers": "one", "alpha": {}}),
                      rehash=True)),
    row("art-other-model", EVAL_ART, "qwen2.5-0.5b", "--model", setup=_other_model),
    # -- crvlm judge: input rows, --out, the judge model ------------------------------------------------------------
    row("judge-missing-input", JUDGE, "in.jsonl", "no such file"),
    row("judge-empty-input", JUDGE, "in.jsonl", "no rows", setup=_write("in.jsonl", "\n")),
    row("judge-no-response", JUDGE, "in.jsonl:2", "`response` is missing",
        setup=_write("in.jsonl", _jsonl({"prompt": "q", "response": "a"}, {"prompt": "q"}))),
    row("judge-response-not-string", JUDGE, "in.jsonl:1", "`response` is not a string",
        setup=_write("in.jsonl", _jsonl({"prompt": "q", "response": 3}))),
    row("judge-no-prompt", JUDGE, "in.jsonl:1", "`prompt` is missing", setup=_write("in.jsonl", _jsonl({"response": "a"}))),
    row("judge-broken-json", JUDGE, "in.jsonl:1", "invalid JSON", setup=_write("in.jsonl", '{"prompt": "q", \n')),
    row("judge-not-an-object", JUDGE, "in.jsonl:1", "JSON object", setup=_write("in.jsonl", '["q", "a"]\n')),
    row("judge-out-exists", JUDGE, "out", "--force", setup=_out_file),
    row("judge-out-is-folder", JUDGE, "out", "is a folder", setup=_out_not_empty),
    row("judge-unknown-judge", [*JUDGE[:4], "oracle", *JUDGE[5:]], "--judge", "invalid choice"),
    row("judge-damaged-model", [*JUDGE[:4], "llm", "--judge-model", "smollm2-135m", *JUDGE[5:]], "damaged",
        "delete that folder", setup=_damaged_judge_model),
    # -- faults -------------------------------------------------------------------------------------------------
    row("eval-ctrl-c", EVAL_ART, "interrupted", "nothing was written", setup=_interrupt(False), code=130),
    row("fit-ctrl-c-force", [*FIT_TINY, "--force"], "interrupted", "nothing was written", code=130,
        setup=_interrupt(False, "crvlm_core.methods.refusal_vectors.fit_vector", out_holds_artifact=True)),
    row("eval-ctrl-c-nnsight", EVAL_ART, "interrupted", "nothing was written", setup=_interrupt(True), code=130),
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A mean-diff vector on tiny-llava, fitted once; each row damages its own copy."""
    art = tmp_path_factory.mktemp("fitted") / "art"
    with pytest.raises(SystemExit) as exc:
        main(["fit", *TINY, "--method", "mean-diff", "--train", "mm_subjects", "--in-scope", "biology", "--layers", "1",
              "--n-train", "2", "--out", str(art)])
    assert exc.value.code == 0
    return art


def _state(path: Path):
    """What --out holds: absent, a file's bytes, or a folder's files and bytes."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("argv, fragments, setup, code", ROWS)
def test_bad_input_gets_one_line_and_loses_nothing(argv, fragments, setup, code, tmp_path, fitted, capsys,
                                                  monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(fitted, art)
    if setup is not None:
        setup(tmp_path, art, monkeypatch)
    out = tmp_path / "out"
    before = _state(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([a.format(out=out, art=art, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == code, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert _state(out) == before  # nothing written, nothing half-written, a file or folder given as --out unchanged



def test_files_of_your_own_are_used_whole(tmp_path, capsys):
    """`fit --train FILE` / `eval --test FILE` use all of each file (a different source than the fit's: nothing to
    hold out), print the counts per scope, and record the split; one bundled dataset is still split 50/50."""
    def data(name: str, n: int) -> Path:
        rows = [{"prompt": f"Question {i} about {s}?", "subject": s, "id": f"{name}-{s}-{i}"}
                for s in ("biology", "history") for i in range(n)]
        (tmp_path / name).write_text(_jsonl(*rows))
        return tmp_path / name

    train, test, art = data("train.jsonl", 6), data("test.jsonl", 4), tmp_path / "art"
    runs = [["fit", *TINY, "--method", "mean-diff", "--train", str(train), "--in-scope", "biology", "--layers", "1",
             "--out", str(art)],
            ["eval", "--artifact", str(art), "--test", str(test), "--max-new-tokens", "1", "--judge", "keyword",
             "--out", str(tmp_path / "ev")],
            ["eval", *TINY, "--test", "mm_subjects", "--in-scope", "biology", "--max-new-tokens", "1", "--judge",
             "keyword", "--out", str(tmp_path / "plain")]]
    for argv in runs:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "train.jsonl (all): 6 out-of-scope / 6 in-scope samples" in out
    assert "test.jsonl (all): 4 out-of-scope / 4 in-scope samples" in out
    fit = json.loads((art / "fit.json").read_text())
    assert (fit["n_in"], fit["n_out"], fit["split"]) == (6, 6, "all")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (metrics["n_in"], metrics["n_out"], metrics["split"]) == (4, 4, "all")
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["split"] == "test" and "mm_subjects (test half)" in out
