"""The workbook: notebooks are stored clean and parameterised; the papermill runner executes them in order,
writes summary.json with each notebook's metrics, and stops at the first failure."""

import json
import math
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from crvlm_core.core.paths import repo_root
from crvlm_core.workbook import kernels, runner as workbook, summary as records
from crvlm_core.workbook.params import WorkbookError, notebooks

NOTEBOOKS = sorted((repo_root() / "workbook").glob("*.ipynb"))
KERNELSPEC = {"name": "crvlm", "display_name": "crvlm (.venv)", "language": "python"}


def _problems(path):
    """What is wrong with a stored workbook notebook (empty list: nothing)."""
    nb = json.loads(path.read_text())
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            problems.append(f"cell {i} stores outputs or an execution count")
    tagged = [c for c in nb.get("cells", []) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells tagged 'parameters' (need exactly one)")
    meta = nb.get("metadata", {})
    if not meta.get("kernelspec", {}).get("name"):
        problems.append("no metadata.kernelspec")
    if not meta.get("language_info", {}).get("name"):
        problems.append("no metadata.language_info")
    return problems


def test_workbook_has_notebooks():
    assert [p.stem for p in notebooks()][:1] == ["00_setup_and_data"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_clean(path):
    assert _problems(path) == []


def test_clean_check_catches_outputs(tmp_path):
    nb = new_notebook(cells=[new_code_cell("x = 1", metadata={"tags": ["parameters"]})],
                      metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    clean = tmp_path / "clean.ipynb"
    nbformat.write(nb, clean)
    assert _problems(clean) == []
    nb.cells[0].execution_count = 1
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    dirty = tmp_path / "dirty.ipynb"
    nbformat.write(nb, dirty)
    assert len(_problems(dirty)) == 1
    del nb.metadata["language_info"]
    nb.cells[0].metadata = {}
    nbformat.write(nb, dirty)
    assert len(_problems(dirty)) == 3


def _write_nb(path, *sources):
    cells = [new_code_cell(sources[0], metadata={"tags": ["parameters"]})] + [new_code_cell(s) for s in sources[1:]]
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}),
                   path)


def test_failing_notebook_stops_the_run(tmp_path, capsys):
    wb = tmp_path / "wb"
    wb.mkdir()
    params = 'RUN = "x"\nSMOKE = False\nOUT_ROOT = None\nLIMIT = 0'
    _write_nb(wb / "00_fine.ipynb", params,
              "import json, pathlib\nd = pathlib.Path(OUT_ROOT) / RUN / '00_fine'\nd.mkdir(parents=True)\n"
              "(d / 'metrics.json').write_text(json.dumps({'limit': LIMIT, 'smoke': SMOKE, 'table': {'a': 1}}))\n"
              "print('hello from 00')")
    _write_nb(wb / "01_broken.ipynb", params, "x = 1", "a = 1\nraise ValueError(f'bad limit {LIMIT}')")
    _write_nb(wb / "02_never.ipynb", params, "raise AssertionError('must not run')")
    (wb / "notes.ipynb").write_text("{}")  # not NN_name: ignored
    (tmp_path / "p.yaml").write_text("LIMIT: 3\nnotebooks:\n  01_broken: {LIMIT: 5}\n")

    summary = workbook.run(params_file=tmp_path / "p.yaml", smoke=True, run_name="t", workbook_dir=wb,
                           out_root=tmp_path / "out")
    out = capsys.readouterr()
    nbs = summary["notebooks"]
    assert list(nbs) == ["00_fine", "01_broken", "02_never"]
    assert summary["ok"] is False
    assert nbs["00_fine"]["status"] == "ok"
    assert nbs["00_fine"]["peak_rss_mb"] > 10  # the kernel's peak memory (a Python kernel is tens of MB at least)
    assert nbs["00_fine"]["metrics"] == {"limit": 3, "smoke": True}  # scalars only; per-file params reached it
    assert nbs["01_broken"]["status"] == "failed"
    assert nbs["01_broken"]["error"]["ename"] == "ValueError"
    assert nbs["01_broken"]["error"]["evalue"] == "bad limit 5"  # the per-notebook section overrides
    assert nbs["02_never"]["status"] == "skipped"
    assert not (tmp_path / "out" / "t" / "notebooks" / "02_never.ipynb").exists()
    assert json.loads((tmp_path / "out" / "t" / "summary.json").read_text()) == summary
    assert "hello from 00" in out.out  # the notebook's own output is streamed
    assert "[workbook] 00_fine ... ok" in out.out
    assert "raise ValueError" in out.err and "ValueError: bad limit 5" in out.err
    assert "Traceback" not in out.err

    # --only runs a subset; the others are skipped; explicit params win over the file.
    summary = workbook.run(params={"LIMIT": 7}, params_file=tmp_path / "p.yaml", only=["00"], run_name="t2",
                           workbook_dir=wb, out_root=tmp_path / "out")
    assert summary["ok"] is True
    assert [e["status"] for e in summary["notebooks"].values()] == ["ok", "skipped", "skipped"]
    assert summary["notebooks"]["00_fine"]["metrics"]["limit"] == 7
    assert summary["notebook_seconds"] == summary["notebooks"]["00_fine"]["seconds"]
    # a later --only run in the same folder keeps 00's record (carried over) instead of marking it skipped
    (wb / "01_broken.ipynb").unlink()
    _write_nb(wb / "01_broken.ipynb", params, "y = 2")
    later = workbook.run(only=["01"], run_name="t2", workbook_dir=wb, out_root=tmp_path / "out")
    nbs = later["notebooks"]
    assert [e["status"] for e in nbs.values()] == ["ok", "ok", "skipped"]
    assert nbs["00_fine"]["carried_over"] == summary["started"]
    assert nbs["00_fine"]["metrics"]["limit"] == 7 and "carried_over" not in nbs["01_broken"]
    assert later["notebook_seconds"] == pytest.approx(nbs["00_fine"]["seconds"] + nbs["01_broken"]["seconds"])
    # a smoke run does not carry a full run's records
    assert workbook.run(only=["01"], run_name="t2", smoke=True, workbook_dir=wb,
                        out_root=tmp_path / "out")["notebooks"]["00_fine"]["status"] == "skipped"
    with pytest.raises(WorkbookError, match="set by the runner"):
        workbook.run(params={"RUN": "other"}, workbook_dir=wb, out_root=tmp_path / "out")
    with pytest.raises(WorkbookError, match="matches no notebook"):
        workbook.run(only=["09"], workbook_dir=wb, out_root=tmp_path / "out")


def test_cli_exit_codes(tmp_path, monkeypatch):
    wb = tmp_path / "wb"
    wb.mkdir()
    _write_nb(wb / "00_boom.ipynb", 'RUN = "x"', "1 / 0")
    calls = {}
    real_run = workbook.run

    def fake_run(**kw):
        calls.update(kw)
        return real_run(**kw, workbook_dir=wb, out_root=tmp_path / "out")

    monkeypatch.setattr(workbook, "run", fake_run)
    with pytest.raises(SystemExit) as exc:
        workbook.main(["run", "--smoke", "--only", "00", "--run", "cli", "-p", "N=3"])
    assert exc.value.code == 1
    assert calls["params"] == {"N": 3} and calls["only"] == ["00"] and calls["smoke"] is True
    with pytest.raises(SystemExit) as exc:
        workbook.main(["run", "--params", str(tmp_path / "missing.yaml")])
    assert exc.value.code == 2


#: Keys each notebook's metrics.json must carry (beyond finite numbers everywhere).
EXPECTED_KEYS = {
    "00_setup_and_data": ["model", "load_seconds", "n_params", "n_layers", "hidden_size", "answer_biology",
                          "answer_harmful", "dataset_counts"],
    "01_refusal_vectors": ["refusal_rate_out", "over_refusal_in", "mb_score", "best", "sweep", "score_sweep"],
    "02_calibrator_training": ["refusal_rate_out", "over_refusal_in", "mb_score", "gate_mean", "table",
                               "throughput_ratio"],
    "03_evaluation": ["refusal_rate_out", "over_refusal_in", "mb_score", "best_method", "crvlm_mb", "judge",
                      "judge_validation", "table", "capability", "capability_ids", "framing"],
    "04_ablations": ["refusal_rate_out", "over_refusal_in", "mb_score", "mb_without_ortho", "table", "vision"],
    "05_figures": ["rho_out", "rho_in", "update_norm_out", "refusal_score_means", "figures"],
    "06_refusal_steering": ["refusal_rate_by_subject", "fits", "profile", "induction", "table", "judge"],
    "07_policies": ["constraints", "joint", "single_constraint_mb", "delta_mb", "kept_design", "goal_joint_mb_090"],
}
#: Metric keys that measure time or speed: they change between runs, everything else must not.
TIMING = ("seconds", "per_second", "throughput", "created", "rss", "wall")


def _numbers(obj, path=""):
    """(path, value) of every number in a JSON value."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _run_smoke(out_root):
    start = time.perf_counter()
    # ORGANISM="auto" (off by default) so 06 also runs on SmolLM2's refusal organism
    summary = workbook.run(params={"MODEL": "smollm2-135m", "ORGANISM": "auto"}, smoke=True, run_name="smoke",
                           out_root=out_root)
    failed = {n: e.get("error") for n, e in summary["notebooks"].items() if e["status"] != "ok"}
    assert summary["ok"] is True and not failed, failed
    metrics = {n: json.loads((out_root / "smoke" / n / "metrics.json").read_text()) for n in summary["notebooks"]}
    return summary, metrics, time.perf_counter() - start


def test_concurrent_only_runs_keep_each_others_records(tmp_path):
    """Two --only runs into one folder at once: before writing, a run takes the records the other wrote meanwhile
    for the notebooks it does not execute, and leaves its own alone."""
    path = tmp_path / "summary.json"
    ours = {"notebooks": {"04_ablations": {"status": "skipped", "reason": "not selected (--only)"},
                          "05_figures": {"status": "ok", "seconds": 10.0}}}
    path.write_text(json.dumps({"smoke": False, "started": "T0", "notebooks": {
        "04_ablations": {"status": "ok", "seconds": 99.0}, "05_figures": {"status": "failed"}}}))
    records.refresh_others(ours, path, {"05_figures"}, smoke=False)
    assert ours["notebooks"]["04_ablations"] == {"status": "ok", "seconds": 99.0, "carried_over": "T0"}
    assert ours["notebooks"]["05_figures"] == {"status": "ok", "seconds": 10.0}
    records.refresh_others(ours, path, {"05_figures"}, smoke=True)  # a smoke summary is not ours to take
    assert ours["notebooks"]["04_ablations"]["seconds"] == 99.0


def test_whole_workbook_smoke_and_cached_rerun(tmp_path):
    """Every notebook end to end through papermill with --smoke on SmolLM2 (and tiny VLMs), then again: the second
    run reuses the cached artifacts, so it is faster and writes the same metrics."""
    summary, metrics, first = _run_smoke(tmp_path)
    assert list(summary["notebooks"]) == [p.stem for p in notebooks()]
    assert set(summary["notebooks"]) >= set(EXPECTED_KEYS)
    for name, m in metrics.items():
        assert m, name
        for key in EXPECTED_KEYS.get(name, []):
            assert key in m, (name, key)
        bad = [(p, v) for p, v in _numbers(m) if not math.isfinite(v)]
        assert not bad, (name, bad)
        assert (tmp_path / "smoke" / "notebooks" / f"{name}.ipynb").exists()
        assert list((tmp_path / "smoke" / name).glob("*.png")) or name == "00_setup_and_data", name
    setup = metrics["00_setup_and_data"]
    assert setup["model"] == "smollm2-135m" and (setup["n_layers"], setup["hidden_size"]) == (30, 576)
    assert setup["answer_biology"] and setup["answer_harmful"]
    assert all(isinstance(n, int) and n > 0 for c in setup["dataset_counts"].values() for n in c.values())
    for fig in ("dataset_counts.png", "dataset_counts.svg", "mm_subjects_examples.png"):
        assert (tmp_path / "smoke" / "00_setup_and_data" / fig).stat().st_size > 0, fig
    assert summary["notebooks"]["00_setup_and_data"]["metrics"]["n_layers"] == 30  # scalars reach the summary
    assert metrics["06_refusal_steering"]["organism"] == "smollm2-135m+censored"
    executed = nbformat.read(tmp_path / "smoke" / "notebooks" / "00_setup_and_data.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    # where the time went: the longest cells, longest first, each pointing at a code cell of the notebook
    slow = summary["notebooks"]["00_setup_and_data"]["slowest_cells"]
    assert slow and [r["seconds"] for r in slow] == sorted((r["seconds"] for r in slow), reverse=True)
    assert all(executed.cells[r["cell"]].cell_type == "code" and r["source"] in executed.cells[r["cell"]].source
               for r in slow)
    assert json.loads((tmp_path / "smoke" / "summary.json").read_text())["ok"] is True

    rerun, again, second = _run_smoke(tmp_path)
    assert second < first
    # 06 caches every evaluation (its searches included): its re-run generates nothing
    secs = lambda s: s["notebooks"]["06_refusal_steering"]["seconds"]
    assert secs(rerun) < 0.5 * secs(summary), (secs(rerun), secs(summary))
    for name in metrics:
        assert _untimed(again[name]) == _untimed(metrics[name]), name
    # the explorers render: with INTERACTIVE their cells display widget views (what JupyterLab draws)
    summary = workbook.run(params={"MODEL": "smollm2-135m", "INTERACTIVE": True}, smoke=True, only=["01", "05"],
                           run_name="smoke", out_root=tmp_path)
    for name in ("01_refusal_vectors", "05_figures"):
        assert summary["notebooks"][name]["status"] == "ok", summary["notebooks"][name].get("error")
        executed = nbformat.read(tmp_path / "smoke" / "notebooks" / f"{name}.ipynb", as_version=4)
        views = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert views, f"{name}: the layer explorer displayed no widget"


def test_headless_runs_use_this_environments_kernel_and_leave_the_users_alone(tmp_path, monkeypatch):
    """The runner executes in a kernel of this venv's own (named after it, registered inside it), never through the
    per-user `crvlm` kernel: re-pointing that one made a concurrent run from another checkout switch venvs."""
    import sys

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user"))
    stale = tmp_path / "user" / "kernels" / "crvlm" / "kernel.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"argv": ["/nonexistent/.venv/bin/python", "-m", "ipykernel_launcher", "-f",
                                          "{connection_file}"], "display_name": "crvlm (.venv)", "language": "python"}))
    before = stale.read_text()
    wb = tmp_path / "wb"
    wb.mkdir()
    _write_nb(wb / "00_where.ipynb", 'RUN = "x"\nSMOKE = False\nOUT_ROOT = None',
              "import json, pathlib, sys\nd = pathlib.Path(OUT_ROOT) / RUN / '00_where'\nd.mkdir(parents=True)\n"
              "(d / 'metrics.json').write_text(json.dumps({'prefix': sys.prefix}))")
    summary = workbook.run(run_name="k", workbook_dir=wb, out_root=tmp_path / "out")
    assert summary["ok"] is True, summary["notebooks"]["00_where"].get("error")
    assert summary["kernel"] == kernels.venv_kernel() != kernels.DEFAULT_KERNEL
    assert json.loads((tmp_path / "out" / "k" / "00_where" / "metrics.json").read_text())["prefix"] == sys.prefix
    assert stale.read_text() == before  # the user's kernel, stale here, was neither used nor re-pointed


def test_default_kernel_is_repointed_at_this_interpreter(tmp_path, monkeypatch):
    """A per-user `crvlm` kernel left by another checkout (or a deleted venv) is re-registered for this one."""
    import json
    import sys

    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    stale = tmp_path / "kernels" / "crvlm"
    stale.mkdir(parents=True)
    (stale / "kernel.json").write_text(json.dumps({"argv": ["/nonexistent/.venv/bin/python", "-m", "ipykernel_launcher",
                                                            "-f", "{connection_file}"],
                                                   "display_name": "crvlm (.venv)", "language": "python"}))
    kernels.ensure_kernel("crvlm")
    argv = json.loads((stale / "kernel.json").read_text())["argv"]
    assert kernels._same_interpreter(argv[0], sys.executable)


def test_each_notebook_reports_its_own_kernel_peak(tmp_path):
    """A notebook that holds 400 MB then a small one: the small one's peak is its own, not the running maximum
    (``RUSAGE_CHILDREN`` would give both the big one's)."""
    wb = tmp_path / "wb"
    wb.mkdir()
    params = 'RUN = "x"\nSMOKE = False\nOUT_ROOT = None'
    _write_nb(wb / "00_big.ipynb", params, "import time\nblock = bytearray(400 * 2**20)\n"
              "block[::4096] = b'x' * len(block[::4096])\ntime.sleep(2.5)")
    _write_nb(wb / "01_small.ipynb", params, "x = 1")
    summary = workbook.run(run_name="m", workbook_dir=wb, out_root=tmp_path / "out")
    big, small = (summary["notebooks"][n]["peak_rss_mb"] for n in ("00_big", "01_small"))
    assert big > 400
    assert 10 < small < big - 300
    assert summary["peak_rss_mb"] == big


def test_a_smoke_run_has_its_own_folder_by_default(tmp_path):
    """`make smoke` after `make workbook` must not overwrite the full run's summary, metrics and artifacts."""
    wb = tmp_path / "wb"
    wb.mkdir()
    _write_nb(wb / "00_run.ipynb", 'RUN = "x"\nSMOKE = False\nOUT_ROOT = None',
              "import pathlib\n(pathlib.Path(OUT_ROOT) / RUN / 'mark').write_text(str(SMOKE))")
    out = tmp_path / "out"
    full = workbook.run(workbook_dir=wb, out_root=out)
    smoke = workbook.run(smoke=True, workbook_dir=wb, out_root=out)
    assert (full["run"], smoke["run"]) == ("default", "smoke")
    assert (out / "default" / "mark").read_text() == "False" and (out / "smoke" / "mark").read_text() == "True"
    assert json.loads((out / "default" / "summary.json").read_text())["smoke"] is False
