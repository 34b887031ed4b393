"""Run the numbered workbook notebooks in order with papermill, into ``outputs/<run>/notebooks/``.

Every notebook gets the same parameters (a YAML file's top-level keys, its ``notebooks: {NN_name: {...}}``
section, then explicit ``params``; plus ``RUN``, ``SMOKE`` and ``OUT_ROOT``); the run stops at the first
failure and leaves ``outputs/<run>/summary.json`` with each notebook's status, wall time and key metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crvlm_core.core.io import atomic_write_json
from crvlm_core.core.paths import outputs_dir, repo_root
from crvlm_core.workbook.kernels import DEFAULT_KERNEL, resolve_kernel
from crvlm_core.workbook.params import (WorkbookError, check_names, check_reserved, check_run_name, notebooks,
                                        parse_value, read_params_file, select_notebooks)
from crvlm_core.workbook.summary import (KernelPeak, earlier_entries, finish_summary, key_metrics, new_summary,
                                         refresh_others, report_failure, slowest_cells)

__all__ = ["add_arguments", "main", "run", "run_from_args"]


def _say(msg: str) -> None:
    print(f"[workbook] {msg}", flush=True)


def _execute(nb: Path, out_nb: Path, params: dict, kernel: str, metrics_path: Path) -> dict:
    """Execute one notebook with papermill; its summary record (status, seconds, output, peak memory, metrics,
    slowest cells, and the error if it failed)."""
    import papermill

    t0 = time.perf_counter()
    with KernelPeak() as peak:
        try:
            papermill.execute_notebook(
                str(nb), str(out_nb), parameters=params, kernel_name=kernel, cwd=str(repo_root()),
                progress_bar=False, log_output=False, stdout_file=sys.stdout, stderr_file=sys.stderr,
            )
            error = None
        except Exception as err:  # PapermillExecutionError, a dead kernel, a kernel that never starts, ...
            error = report_failure(nb.stem, err, out_nb)
    entry = {"status": "ok" if error is None else "failed", "seconds": round(time.perf_counter() - t0, 2),
             "output": str(out_nb), "peak_rss_mb": peak.peak_mb(),
             "metrics": key_metrics(metrics_path) if metrics_path.exists() else None,
             "slowest_cells": slowest_cells(out_nb)}
    if error is not None:
        entry["error"] = error
    slow = entry["slowest_cells"][:1]
    _say(f"{nb.stem} ... {entry['status']} ({entry['seconds']:.1f} s"
         + (f"; slowest cell {slow[0]['cell']}: {slow[0]['seconds']:.1f} s, {slow[0]['source'][:40]!r}" if slow else "")
         + ")")
    return entry


def run(params: dict | None = None, params_file: str | Path | None = None, smoke: bool = False,
        only: list[str] | None = None, run_name: str | None = None, kernel: str = DEFAULT_KERNEL,
        workbook_dir: str | Path | None = None, out_root: str | Path | None = None) -> dict:
    """Execute the workbook notebooks in order; stop at the first failure.

    Args:
        params: parameters for every notebook (override the file's).
        params_file: YAML file: top-level keys go to every notebook, ``notebooks: {NN_name: {...}}`` to one.
        smoke: passed as ``SMOKE``: notebooks use tiny sample counts.
        only: NN prefixes (``["00", "02"]``) of the notebooks to run; the others are marked skipped.
        run_name: the run's folder under ``out_root`` (passed as ``RUN``); default ``smoke`` for a smoke run and
            ``default`` otherwise, so a smoke run never overwrites the full run's results and cached artifacts.
        kernel: Jupyter kernel name; the default ``crvlm`` runs this interpreter's own kernel (:func:`~crvlm_core.workbook.kernels.venv_kernel`),
            any other name must be registered.
        workbook_dir: folder of the notebooks (default ``<repo>/workbook``).
        out_root: root of the outputs (default :func:`crvlm_core.core.paths.outputs_dir`; passed as ``OUT_ROOT``).

    Returns:
        The summary written to ``<out_root>/<run_name>/summary.json``: ``ok``, and per notebook ``status``
        (``ok`` / ``failed`` / ``skipped``), ``seconds``, ``output`` (the executed notebook), ``metrics``
        (scalar entries of its ``metrics.json``), ``peak_rss_mb`` (its kernel's peak resident memory,
        :class:`~crvlm_core.workbook.summary.KernelPeak`), ``slowest_cells`` (its three longest code cells:
        index, seconds, first source line) and, on failure, ``error`` (``ename``, ``evalue``, ``cell_index``); overall ``seconds`` (this invocation),
        ``notebook_seconds`` (sum over the notebooks that are ok) and ``peak_rss_mb`` (the largest of theirs).
        With ``only``, a notebook not selected keeps the record an earlier run of the same folder (same ``smoke``)
        wrote for it, with ``carried_over`` set to that run's start time; without one it is ``skipped``.
    """
    import papermill  # noqa: F401  (a missing papermill surfaces here, before any check or kernel)

    run_name = run_name if run_name is not None else ("smoke" if smoke else "default")
    check_run_name(run_name)
    common, per_nb = read_params_file(params_file) if params_file else ({}, {})
    params = dict(params or {})
    check_names(common, str(params_file))
    check_names(params, "params")
    check_reserved(common, params, per_nb)
    nbs = notebooks(workbook_dir)
    if not nbs:
        raise WorkbookError(f"no NN_name.ipynb notebooks in {workbook_dir or repo_root() / 'workbook'}")
    selected = select_notebooks(nbs, per_nb, only, params_file)
    kernel = resolve_kernel(kernel)
    root = Path(out_root).resolve() if out_root is not None else outputs_dir()
    run_dir = root / run_name
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    fixed = {"RUN": run_name, "SMOKE": bool(smoke), "OUT_ROOT": str(root)}
    summary = new_summary(run_name, smoke, kernel, {**common, **params}, params_file, [p.stem for p in nbs])
    summary_path = run_dir / "summary.json"
    earlier = earlier_entries(summary_path, bool(smoke)) if only else {}
    failed = False
    started = time.perf_counter()
    for nb in nbs:
        entry = summary["notebooks"][nb.stem]
        if nb.stem not in selected:  # an --only run keeps what an earlier run of this folder recorded for the others
            entry.clear()
            entry.update(earlier.get(nb.stem) or {"status": "skipped", "reason": "not selected (--only)"})
            continue
        if failed:
            entry.update(status="skipped", reason="an earlier notebook failed")
            continue
        _say(f"{nb.stem} ... running")
        entry.update(_execute(nb, run_dir / "notebooks" / nb.name, {**common, **per_nb.get(nb.stem, {}), **params,
                                                                     **fixed}, kernel, run_dir / nb.stem / "metrics.json"))
        failed = entry["status"] == "failed"
        # a partial summary survives an interrupted run
        atomic_write_json(summary_path, refresh_others(summary, summary_path, selected, bool(smoke)) if only else summary)
    if only:
        refresh_others(summary, summary_path, selected, bool(smoke))
    atomic_write_json(summary_path, finish_summary(summary, failed, started))
    n_ok = sum(summary["notebooks"][n]["status"] == "ok" for n in selected)
    _say(f"{'done' if not failed else 'stopped'}: {n_ok}/{len(selected)} notebook(s) ok in {summary['seconds']:.1f} s; "
         f"summary: {summary_path}")
    return summary


# --------------------------------------------------------------------------------------------------
# Command line: `crvlm workbook run [...]`
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``workbook`` sub-command's arguments (``run`` action and its options) to ``parser``."""
    parser.add_argument("action", choices=["run", "list"], nargs="?", default="run",
                        help="run the notebooks (default) or list them")
    parser.add_argument("--params", metavar="FILE.yaml", help="YAML parameters: top-level keys for every "
                        "notebook, 'notebooks: {NN_name: {...}}' for one")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="one parameter for every notebook (YAML value), e.g. -p MODEL=smollm2-135m; repeatable")
    parser.add_argument("--smoke", action="store_true", help="tiny sample counts, to check the plumbing")
    parser.add_argument("--only", metavar="NN[,NN]", help="run only these notebooks, by number prefix")
    parser.add_argument("--run", default=None, metavar="NAME",
                        help="run name: outputs go to outputs/NAME/ (default: default, or smoke with --smoke)")
    parser.add_argument("--kernel", default=DEFAULT_KERNEL, metavar="NAME", help="Jupyter kernel (default: crvlm)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the parsed ``workbook`` command; return the exit code (0 ok, 1 a notebook failed, 2 bad usage)."""
    try:
        if getattr(args, "action", "run") == "list":
            for p in notebooks():
                print(p.stem)
            return 0
        params = {}
        for item in args.param or []:
            name, sep, value = item.partition("=")
            if not sep:
                raise WorkbookError(f"-p expects NAME=VALUE, got {item!r}")
            params[name.strip()] = parse_value(value)
        only = [o for o in (args.only or "").split(",") if o.strip()] or None
        summary = run(params=params, params_file=args.params, smoke=args.smoke, only=only,
                      run_name=args.run, kernel=args.kernel)
    except WorkbookError as err:
        print(f"[workbook] error: {err}", file=sys.stderr)
        return 2
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> None:
    """``python -m crvlm_core.workbook.runner [run] [--params FILE] [--smoke] [--only NN[,NN]] [--run NAME] [--kernel NAME]``."""
    parser = argparse.ArgumentParser(prog="crvlm workbook", description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(run_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
