"""The artifact contract (core.artifacts): a folder is written whole, read only when every hash matches, and never
overwritten without --force; and `crvlm fit` / `crvlm eval` on a tiny model keep to it (exit 2, one line)."""

import json

import pytest

from crvlm_core.cli.main import main
from crvlm_core.core.artifacts import (ARTIFACT_JSON, FIT_JSON, FORMAT_VERSION, ArtifactError, ArtifactExists,
                                       check_writable, read_manifest, write_artifact)
from crvlm_core.core.errors import InputError

MODEL = {"spec": "m", "key": "m", "hidden_size": 4, "n_layers": 2}


def _write(folder, payload=b"tensor bytes", force=False, kind="vector"):
    def files(tmp):
        (tmp / "weights.bin").write_bytes(payload)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.json").write_text('{"a": 1}')

    return write_artifact(folder, kind, files, config={"c": 1}, model=MODEL, inputs={"data": "x"}, force=force,
                          extra_json={FIT_JSON: {"method": "m"}})


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_written_whole_and_read_back(tmp_path):
    folder = _write(tmp_path / "a")
    manifest = read_manifest(folder, kinds=("vector",))
    assert manifest["kind"] == "vector" and manifest["format_version"] == FORMAT_VERSION
    assert set(manifest["files"]) == {"weights.bin", "sub/part.json", FIT_JSON}  # nested files and fit.json hashed
    assert manifest["model"] == MODEL and len(manifest["inputs"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary folder left beside it


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "weights.bin").write_bytes(b"other bytes"), "changed or damaged"),
    (lambda f: (f / "sub" / "part.json").unlink(), "is missing"),
    (lambda f: (f / ARTIFACT_JSON).write_text("{not json"), "not valid JSON"),
    (lambda f: (f / ARTIFACT_JSON).write_text("[1, 2]"), "not an artifact manifest"),
])
def test_a_damaged_folder_is_one_line_error(tmp_path, damage, message):
    folder = _write(tmp_path / "a")
    damage(folder)
    with pytest.raises(ArtifactError, match=message) as err:
        read_manifest(folder)
    assert "\n" not in str(err.value) and isinstance(err.value, InputError)


def test_wrong_kind_old_format_and_no_folder(tmp_path):
    folder = _write(tmp_path / "a")
    with pytest.raises(ArtifactError, match="holds a 'vector' artifact; expected crvlm"):
        read_manifest(folder, kinds=("crvlm",))
    old = tmp_path / "old"
    old.mkdir()
    (old / FIT_JSON).write_text(json.dumps({"method": "teacher-forced"}))
    with pytest.raises(ArtifactError, match="before artifact.json existed: re-fit"):
        read_manifest(old)
    with pytest.raises(ArtifactError, match="no such folder"):
        read_manifest(tmp_path / "missing")
    manifest = json.loads((folder / ARTIFACT_JSON).read_text())
    (folder / ARTIFACT_JSON).write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(ArtifactError, match="format_version 0"):
        read_manifest(folder)


def test_check_writable_and_force_replaces_whole(tmp_path):
    assert check_writable(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_writable(tmp_path / "empty")
    folder = _write(tmp_path / "a")
    before = _snapshot(folder)
    with pytest.raises(ArtifactExists, match="holds an artifact.*--force"):
        _write(folder, b"new bytes")
    assert _snapshot(folder) == before  # refused: untouched
    (folder / "stray.txt").write_text("left from before")
    _write(folder, b"new bytes", force=True)
    assert not (folder / "stray.txt").exists()  # replaced whole, not merged
    assert (folder / "weights.bin").read_bytes() == b"new bytes"
    read_manifest(folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactExists, match="is a file"):
        check_writable(tmp_path / "file", force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ArtifactExists, match="is not empty"):
        check_writable(tmp_path / "other")


def _cli(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_cli_fit_refuses_a_used_folder_and_force_replaces_it(tmp_path, capsys):
    """`crvlm fit` on the tiny random VLM: artifact.json with kind and format_version; a second fit into the same
    folder exits 2 with one line before loading anything, leaving the folder byte-identical; --force replaces it."""
    art = tmp_path / "art"
    fit = ["fit", "--model", "tiny-llava", "--method", "mean-diff", "--train", "mm_subjects", "--in-scope",
           "biology", "--layers", "1", "--n-train", "2", "--out", str(art)]
    assert _cli(fit) == 0
    manifest = json.loads((art / ARTIFACT_JSON).read_text())
    assert manifest["kind"] == "vector" and manifest["format_version"] == FORMAT_VERSION
    assert FIT_JSON in manifest["files"] and json.loads((art / FIT_JSON).read_text())["layers"] == [1]
    before = _snapshot(art)
    capsys.readouterr()
    assert _cli(fit[:-4] + ["--layers", "0", "--out", str(art)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err and str(art) in err
    assert _snapshot(art) == before
    # checked before the model loads: a model that does not exist is never reached
    assert _cli(fit[:2] + ["no-such-model"] + fit[3:]) == 2
    assert "holds an artifact" in capsys.readouterr().err and _snapshot(art) == before
    assert _cli(fit[:-4] + ["--layers", "0", "--out", str(art), "--force"]) == 0
    assert json.loads((art / FIT_JSON).read_text())["layers"] == [0]
    read_manifest(art, kinds=("vector",))


def test_cli_eval_of_a_damaged_artifact_is_exit_2(tmp_path, capsys):
    art = tmp_path / "art"
    assert _cli(["fit", "--model", "tiny-llava", "--method", "mean-diff", "--train", "mm_subjects", "--in-scope",
                 "biology", "--layers", "1", "--n-train", "2", "--out", str(art)]) == 0
    (art / "vector.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert _cli(["eval", "--artifact", str(art), "--n-test", "1", "--max-new-tokens", "2", "--judge", "keyword",
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "vector.safetensors" in err and "changed or damaged" in err
    assert not (tmp_path / "ev").exists()


def test_load_artifact_registry_on_a_tiny_model(tmp_path):
    """methods.loading: one loader per kind; a vector gives its intervention (with --alpha/--layers overrides), a
    system-prompt baseline gives a system prompt and no interventions (so it is not served as a steered variant)."""
    from crvlm_core.methods.loading import LOADERS, load_artifact, load_interventions
    from crvlm_core.models.loading import load_model

    assert set(LOADERS) >= {"vector", "crvlm", "baseline", "policy", "refusal-steering"}
    tiny = load_model("tiny-llava")
    base = ["fit", "--model", "tiny-llava", "--train", "mm_subjects", "--in-scope", "biology", "--n-train", "2"]
    assert _cli(base + ["--method", "mean-diff", "--layers", "1", "--alpha", "2", "--out", str(tmp_path / "v")]) == 0
    loaded = load_artifact(tmp_path / "v", tiny)
    (iv,) = loaded.interventions
    assert loaded.kind == "vector" and loaded.handle is tiny and loaded.system is None
    assert iv.layers == (1,) and iv.alpha == 2.0
    (iv,) = load_artifact(tmp_path / "v", tiny, alpha=0.5, layers=[0]).interventions
    assert iv.layers == (0,) and iv.alpha == 0.5
    assert _cli(base + ["--method", "system-prompt", "--out", str(tmp_path / "s")]) == 0
    loaded = load_artifact(tmp_path / "s", tiny)
    assert loaded.kind == "baseline" and loaded.interventions == [] and "biology" in loaded.system
    with pytest.raises(InputError, match="not an intervention"):
        load_interventions(tmp_path / "s", tiny)
    with pytest.raises(ArtifactError, match="no such folder"):
        load_artifact(tmp_path / "missing", tiny)
