"""Strict JSON (#24): every JSON the project writes is valid JSON, never NaN or Infinity. "Not measured" is null
and reads back; a non-finite number reaching a writer is one line naming the file and the key, and nothing is
written."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from crvlm_core.core.artifacts import write_artifact
from crvlm_core.core.cache import cached_json, cached_tensors, entry_path
from crvlm_core.core.errors import InputError
from crvlm_core.core.io import (METRICS_JSON, SAMPLES_JSONL, NonFiniteError, atomic_write_json, nan_to_none,
                                strict_dumps, write_run_outputs)
from crvlm_core.metrics import scope_metrics


def _strict_load(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_atomic_write_json_refuses_non_finite_in_one_line_and_writes_nothing(tmp_path, value):
    dest = tmp_path / "run" / "metrics.json"
    with pytest.raises(NonFiniteError) as err:
        atomic_write_json(dest, {"ok": 1, "sweep": [{"alpha": 1.0}, {"alpha": value}]})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{dest}: cannot write sweep[1].alpha = ")
    assert isinstance(err.value, InputError) and err.value.__cause__ is None
    assert not dest.parent.exists()  # not even the folder


def test_atomic_write_json_keeps_the_old_file_when_refusing(tmp_path):
    dest = tmp_path / "m.json"
    atomic_write_json(dest, {"v": 1})
    with pytest.raises(NonFiniteError, match=r"m\.json: cannot write v = inf"):
        atomic_write_json(dest, {"v": math.inf})
    assert _strict_load(dest) == {"v": 1} and os.listdir(tmp_path) == ["m.json"]


def test_null_round_trips_and_nan_to_none():
    assert nan_to_none(math.nan) is None and nan_to_none(0.5) == 0.5 and nan_to_none("x") == "x"
    assert nan_to_none(math.inf) == math.inf  # an infinity is an error for the writer, not "not measured"
    assert json.loads(strict_dumps({"kl": nan_to_none(math.nan)}, "x.json")) == {"kl": None}
    with pytest.raises(TypeError):
        strict_dumps({"a": object()}, "x.json")


def test_run_outputs_non_finite_row_leaves_out_untouched(tmp_path):
    out = tmp_path / "out"
    rows = [{"id": "a", "refusal_score": 1.0}, {"id": "b", "refusal_score": -math.inf}]
    with pytest.raises(NonFiniteError) as err:
        write_run_outputs(out, {"refusal_rate_out": 1.0}, rows)
    assert str(err.value).startswith(f"{out / SAMPLES_JSONL}:2: cannot write refusal_score = -inf")
    assert not out.exists(), "metrics.json must not be written when samples.jsonl cannot be"
    with pytest.raises(NonFiniteError, match=r"metrics\.json: cannot write mean_refusal_score_out = nan"):
        write_run_outputs(out, {"mean_refusal_score_out": math.nan}, rows[:1])
    assert not out.exists()


def test_run_outputs_are_strict_json_with_nulls(tmp_path):
    metrics = scope_metrics([True, False, True], ["out", "out", "out"], ci=True, n_boot=50)  # no in-scope samples
    assert metrics["over_refusal_in"] is None and metrics["mb_score"] is None
    assert metrics["over_refusal_in_ci"] == [None, None] and metrics["mb_score_ci"] == [None, None]
    assert metrics["refusal_rate_out"] == pytest.approx(2 / 3)
    write_run_outputs(tmp_path, {**metrics, "tokens_per_second": None}, [{"id": "a", "score": None}])
    back = _strict_load(tmp_path / METRICS_JSON)
    assert back["over_refusal_in"] is None and back["tokens_per_second"] is None
    assert [json.loads(line) for line in (tmp_path / SAMPLES_JSONL).read_text().splitlines()] == \
        [{"id": "a", "score": None}]


def test_cache_never_stores_non_finite_and_recomputes_old_nan_entries(tmp_path):
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"x": value}
        return run

    assert cached_json(tmp_path, "t", {"k": 1}, compute(math.inf)) == {"x": math.inf}  # returned, not stored
    assert not any(tmp_path.iterdir())
    path = entry_path(tmp_path, "t", {"k": 2})
    path.write_text('{"key": {"k": 2}, "value": {"x": NaN}}')  # an entry written before strict JSON
    assert cached_json(tmp_path, "t", {"k": 2}, compute(None)) == {"x": None}
    assert _strict_load(path) == {"key": {"k": 2}, "value": {"x": None}}
    assert cached_json(tmp_path, "t", {"k": 2}, compute(5)) == {"x": None} and calls == [math.inf, None]
    tensors, meta, hit = cached_tensors(tmp_path, "acts", {"k": 3}, lambda: ({"a": torch.ones(2)}, {"m": math.nan}))
    assert not hit and math.isnan(meta["m"])
    assert not entry_path(tmp_path, "acts", {"k": 3}, ".safetensors").exists()  # no sidecar, no tensor file


def test_artifact_with_non_finite_config_names_the_final_file_and_leaves_nothing(tmp_path):
    folder = tmp_path / "art"
    with pytest.raises(NonFiniteError) as err:
        write_artifact(folder, "vector", lambda tmp: (tmp / "x.bin").write_bytes(b"x"),
                       config={"alpha": math.inf}, model={}, inputs={})
    assert str(err.value).startswith(f"{folder / 'artifact.json'}: cannot write config.alpha = inf")
    with pytest.raises(NonFiniteError, match=r"art/fit\.json: cannot write fit_seconds = nan"):
        write_artifact(folder, "vector", lambda tmp: None, config={}, model={}, inputs={},
                       extra_json={"fit.json": {"fit_seconds": math.nan}})
    assert not any(tmp_path.iterdir())


def test_no_deliberate_nan_left_in_written_sources():
    """The sources that made NaN on purpose for "not measured" now give None: the only remaining float("nan") are
    in-memory results of metric functions (documented there) and the objective of an unmeasured KL."""
    import pathlib

    import crvlm_core

    root = pathlib.Path(crvlm_core.__file__).parent
    allowed = {"metrics.py", "judges/base.py", "judges/validation.py", "methods/baselines/compare.py",
               "methods/refusal_steering/search.py", "methods/refusal_steering/gate.py"}
    found = {p.relative_to(root).as_posix() for p in root.rglob("*.py") if 'float("nan")' in p.read_text()}
    assert found <= allowed, sorted(found - allowed)
