"""Run the numbered workbook notebooks in order with papermill, into ``outputs/<run>/notebooks/``.

Every notebook gets the same parameters (a YAML file's top-level keys, its ``notebooks: {NN_name: {...}}``
section, then explicit ``params``; plus ``RUN``, ``SMOKE`` and ``OUT_ROOT``); the run stops at the first
failure and leaves ``outputs/<run>/summary.json`` with each notebook's status, wall time and key metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crvlm_core.core.io import atomic_write_json
from crvlm_core.core.paths import outputs_dir, repo_root

__all__ = [
    "DEFAULT_KERNEL",
    "WorkbookError",
    "add_arguments",
    "ensure_kernel",
    "main",
    "notebooks",
    "run",
    "run_from_args",
    "venv_kernel",
]

DEFAULT_KERNEL = "crvlm"
_NB_NAME = re.compile(r"^(\d{2})_[A-Za-z0-9_\-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SOURCE_LINES = 8  # lines of a failing cell's source shown in the error report


class WorkbookError(RuntimeError):
    """The workbook could not be started (bad parameters, unknown notebook prefix, no kernel)."""


def _say(msg: str) -> None:
    print(f"[workbook] {msg}", flush=True)


def notebooks(workbook_dir: str | Path | None = None) -> list[Path]:
    """The workbook notebooks ``NN_name.ipynb`` of ``workbook_dir`` (default ``<repo>/workbook``), sorted by NN.

    Files not named ``NN_name.ipynb`` (checkpoints, scratch notebooks) are ignored.
    """
    folder = Path(workbook_dir) if workbook_dir is not None else repo_root() / "workbook"
    if not folder.is_dir():
        raise WorkbookError(f"no workbook folder at {folder}")
    found = [p for p in folder.glob("*.ipynb") if _NB_NAME.match(p.stem)]
    return sorted(found, key=lambda p: (int(p.stem[:2]), p.stem))


def _read_params_file(path: str | Path) -> tuple[dict, dict[str, dict]]:
    """(common parameters, per-notebook parameters) from a YAML file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise WorkbookError(f"cannot read the parameters file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise WorkbookError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise WorkbookError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    per = data.pop("notebooks", None) or {}
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise WorkbookError(f"{path}: 'notebooks' must map notebook names (e.g. 00_setup_and_data) to parameter mappings")
    return data, {str(k): v for k, v in per.items()}


def _check_names(params: dict, where: str) -> None:
    bad = [k for k in params if not isinstance(k, str) or not _IDENT.match(k)]
    if bad:
        raise WorkbookError(f"{where}: parameter names must be Python identifiers, got {bad}")


def _same_interpreter(a: str, b: str) -> bool:
    """Whether two interpreter paths belong to the same environment (venv pythons are symlinks into a shared
    base install, so compare their ``bin`` folders, not the resolved executables)."""
    try:
        return Path(a).parent.resolve() == Path(b).parent.resolve()
    except OSError:
        return False


def venv_kernel() -> str:
    """The kernel a headless run of the default kernel uses: this interpreter's own, registered inside its
    environment (``<sys.prefix>/share/jupyter/kernels/crvlm-<hash of sys.prefix>``) on first use.

    The per-user ``crvlm`` kernel (for JupyterLab) is one name shared by every checkout on the machine: a run that
    re-pointed it at its own venv made the notebooks of another checkout's run, started later, execute in that venv.
    A name of its own per environment cannot be taken over, and Jupyter finds it from this interpreter.

    Raises:
        WorkbookError: ipykernel could not register it (the message says to run ``make setup``).
    """
    name = f"{DEFAULT_KERNEL}-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / name / "kernel.json"
    try:
        argv = json.loads(spec.read_text()).get("argv") or [""]
    except (OSError, ValueError, AttributeError):
        argv = [""]
    if not _same_interpreter(argv[0], sys.executable):
        error = _install_kernel(name, "--sys-prefix", "crvlm (.venv, headless runs)")
        if error is not None or not spec.exists():
            raise WorkbookError(f"could not register the Jupyter kernel {name!r} in {sys.prefix} "
                                f"({error or 'not found after registering'}); run `make setup`")
    return name


def _install_kernel(name: str, where: str, display_name: str) -> str | None:
    """Register this interpreter as the Jupyter kernel ``name`` (``where``: ``--user`` or ``--sys-prefix``).

    Returns:
        None, or the last line of ipykernel's error.
    """
    proc = subprocess.run([sys.executable, "-m", "ipykernel", "install", where, "--name", name,
                           "--display-name", display_name], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""])[0]


def ensure_kernel(kernel: str = DEFAULT_KERNEL) -> str:
    """Make sure the Jupyter kernel ``kernel`` is registered; register ``crvlm`` for this interpreter if missing.

    Returns:
        The kernel's resource folder.

    Raises:
        WorkbookError: The kernel is not registered and could not be (the message says to run ``make setup``).
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(kernel)
        # The default kernel must run this interpreter: with two checkouts (or a CI clone) the per-user kernel
        # may point at another venv, or at one that no longer exists.
        if kernel != DEFAULT_KERNEL or _same_interpreter(spec.argv[0] if spec.argv else "", sys.executable):
            return spec.resource_dir
        _say(f"Jupyter kernel {kernel!r} points at {spec.argv[0]}: re-registering it for {sys.executable}")
    except NoSuchKernel:
        if kernel == DEFAULT_KERNEL:
            _say(f"Jupyter kernel {kernel!r} is not registered: registering it for {sys.executable}")
    if kernel == DEFAULT_KERNEL:
        error = _install_kernel(kernel, "--user", "crvlm (.venv)")
        if error is None:
            try:
                return KernelSpecManager().get_kernel_spec(kernel).resource_dir
            except NoSuchKernel:
                pass
        raise WorkbookError(f"could not register the Jupyter kernel {kernel!r} "
                            f"({error or 'not found after registering'}); run `make setup`")
    raise WorkbookError(f"no Jupyter kernel named {kernel!r}; list them with `jupyter kernelspec list`, "
                        f"or run `make setup` and use the default kernel {DEFAULT_KERNEL!r}")


def _key_metrics(path: Path) -> dict | None:
    """The scalar entries of a notebook's metrics.json (nested tables stay in the file)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    out = {}
    for k, v in data.items():
        if isinstance(v, bool) or v is None:
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v if math.isfinite(v) else str(v)
        elif isinstance(v, str) and len(v) <= 200:
            out[k] = v
    return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _report_failure(name: str, err: Exception, executed: Path) -> dict:
    """Print a failing cell's first source lines and its error; return the summary's error record."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        record = {"ename": err.ename, "evalue": err.evalue, "cell_index": err.cell_index}
        lines = (err.source or "").splitlines()
        print(f"[workbook] {name} failed in cell {err.cell_index} (In [{err.exec_count}]):", file=sys.stderr)
        for line in lines[:_SOURCE_LINES]:
            print(f"    | {line}", file=sys.stderr)
        if len(lines) > _SOURCE_LINES:
            print(f"    | ... ({len(lines) - _SOURCE_LINES} more lines)", file=sys.stderr)
    else:
        record = {"ename": type(err).__name__, "evalue": str(err), "cell_index": None}
    print(f"[workbook] {record['ename']}: {record['evalue']}", file=sys.stderr)
    if executed.exists():
        print(f"[workbook] full traceback in {executed}", file=sys.stderr, flush=True)
    return record


def first_code_line(src: str) -> str:
    """A code cell's first line that is neither blank nor a comment (stripped): how a cell is named in reports."""
    return next((line.strip() for line in src.splitlines() if line.strip() and not line.lstrip().startswith("#")), "")


def _slowest_cells(executed: Path, k: int = 3) -> list[dict]:
    """The ``k`` longest code cells of an executed notebook (papermill's per-cell ``duration``): where its time went."""
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return []
    rows = []
    for i, cell in enumerate(cells):
        duration = cell.get("metadata", {}).get("papermill", {}).get("duration")
        if cell.get("cell_type") != "code" or not isinstance(duration, (int, float)):
            continue
        rows.append({"cell": i, "seconds": round(float(duration), 2),
                     "source": first_code_line("".join(cell.get("source", "")))[:80]})
    return sorted(rows, key=lambda r: -r["seconds"])[:k]


def _children_peak_rss_mb() -> float:
    """Peak resident memory (MB) of the largest finished child process so far (``RUSAGE_CHILDREN``): a running
    maximum over the kernels of this process's notebooks, the fallback where ``/proc`` cannot be read."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    return round(kb / 1024, 1)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (children, grandchildren, ...), read from ``/proc/<pid>/stat``."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parent.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _high_water_kb(pid: int) -> int:
    """``VmHWM`` (peak resident set, kB) of a live process, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _KernelPeak:
    """Peak resident memory (MB) of one notebook's kernel: a thread reads the high-water mark (``VmHWM``) of this
    process's descendants every ``interval`` seconds while the notebook runs, so each notebook gets its own peak
    (``RUSAGE_CHILDREN`` only keeps the largest since the start). ``VmHWM`` is itself a maximum, so sampling
    misses only growth in the last interval before the kernel exits. ``mb`` is None where ``/proc`` is absent
    (the caller falls back to ``RUSAGE_CHILDREN``) or no sample was taken."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.kb = 0
        self.usable = Path(f"/proc/{os.getpid()}/status").exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.kb = max([self.kb] + [_high_water_kb(pid) for pid in _descendants(os.getpid())])

    def __enter__(self) -> "_KernelPeak":
        if self.usable:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.usable:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float | None:
        return round(self.kb / 1024, 1) if self.kb else None


def _earlier_entries(summary_path: Path, smoke: bool) -> dict[str, dict]:
    """The notebook records of an earlier run in the same folder that ran (ok or failed), marked as carried over.

    Only a run of the same kind (smoke or not) counts; an unreadable summary counts as none.
    """
    try:
        old = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return {}
    if bool(old.get("smoke")) != smoke:
        return {}
    out = {}
    for name, e in (old.get("notebooks") or {}).items():
        if isinstance(e, dict) and e.get("status") in ("ok", "failed"):
            out[name] = {**e, "carried_over": e.get("carried_over") or old.get("started")}
    return out


def _refresh_others(summary: dict, summary_path: Path, selected, smoke: bool) -> dict:
    """Take into ``summary`` the records another run has written meanwhile for the notebooks this run does not
    execute: two ``--only`` runs into the same folder at once (say 04 and 05) keep each other's results."""
    for name, entry in _earlier_entries(summary_path, smoke).items():
        if name not in selected and name in summary["notebooks"]:
            summary["notebooks"][name] = entry
    return summary


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
        kernel: Jupyter kernel name; the default ``crvlm`` runs this interpreter's own kernel (:func:`venv_kernel`),
            any other name must be registered.
        workbook_dir: folder of the notebooks (default ``<repo>/workbook``).
        out_root: root of the outputs (default :func:`crvlm_core.core.paths.outputs_dir`; passed as ``OUT_ROOT``).

    Returns:
        The summary written to ``<out_root>/<run_name>/summary.json``: ``ok``, and per notebook ``status``
        (``ok`` / ``failed`` / ``skipped``), ``seconds``, ``output`` (the executed notebook), ``metrics``
        (scalar entries of its ``metrics.json``), ``peak_rss_mb`` (its kernel's peak resident memory,
        :class:`_KernelPeak`), ``slowest_cells`` (its three longest code cells: index, seconds, first source line)
        and, on failure, ``error`` (``ename``, ``evalue``, ``cell_index``); overall ``seconds`` (this invocation),
        ``notebook_seconds`` (sum over the notebooks that are ok) and ``peak_rss_mb`` (the largest of theirs).
        With ``only``, a notebook not selected keeps the record an earlier run of the same folder (same ``smoke``)
        wrote for it, with ``carried_over`` set to that run's start time; without one it is ``skipped``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError  # noqa: F401  (import errors surface here, early)

    if run_name is None:
        run_name = "smoke" if smoke else "default"
    if not isinstance(run_name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$", run_name):
        raise WorkbookError(f"run name must be a plain folder name (letters, digits, . _ -), got {run_name!r}")
    common, per_nb = _read_params_file(params_file) if params_file else ({}, {})
    params = dict(params or {})
    _check_names(common, str(params_file))
    _check_names(params, "params")
    reserved = sorted({"RUN", "SMOKE", "OUT_ROOT"} & (set(common) | set(params) | {k for v in per_nb.values() for k in v}))
    if reserved:
        raise WorkbookError(f"{reserved} are set by the runner: use run_name / smoke / out_root "
                            f"(--run / --smoke / $CRVLM_OUTPUTS) instead")
    nbs = notebooks(workbook_dir)
    if not nbs:
        raise WorkbookError(f"no NN_name.ipynb notebooks in {workbook_dir or repo_root() / 'workbook'}")
    names = [p.stem for p in nbs]
    unknown_nb = sorted(set(per_nb) - set(names))
    if unknown_nb:
        raise WorkbookError(f"{params_file}: 'notebooks' names unknown notebook(s) {unknown_nb}; known: {names}")
    selected = set(names)
    if only:
        prefixes = [str(o).strip() for o in only if str(o).strip()]
        missing = [o for o in prefixes if not any(n.startswith(o) for n in names)]
        if missing:
            raise WorkbookError(f"--only {','.join(missing)} matches no notebook; known: {', '.join(names)}")
        selected = {n for n in names if any(n.startswith(o) for o in prefixes)}
    if kernel == DEFAULT_KERNEL:
        kernel = venv_kernel()
    else:
        ensure_kernel(kernel)

    root = Path(out_root).resolve() if out_root is not None else outputs_dir()
    run_dir = root / run_name
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    fixed = {"RUN": run_name, "SMOKE": bool(smoke), "OUT_ROOT": str(root)}
    summary: dict[str, Any] = {
        "run": run_name,
        "smoke": bool(smoke),
        "kernel": kernel,
        "params": _jsonable({**common, **params}),
        "params_file": str(params_file) if params_file else None,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": None,
        "ok": None,
        "notebooks": {n: {"status": "pending"} for n in names},
    }
    summary_path = run_dir / "summary.json"
    earlier = _earlier_entries(summary_path, bool(smoke)) if only else {}
    failed = False
    started = time.perf_counter()
    for nb in nbs:
        name = nb.stem
        entry = summary["notebooks"][name]
        if name not in selected:
            if name in earlier:  # an --only run keeps what an earlier run of this folder recorded for the others
                entry.clear()
                entry.update(earlier[name])
            else:
                entry.update(status="skipped", reason="not selected (--only)")
            continue
        if failed:
            entry.update(status="skipped", reason="an earlier notebook failed")
            continue
        out_nb = run_dir / "notebooks" / nb.name
        nb_params = {**common, **per_nb.get(name, {}), **params, **fixed}
        _say(f"{name} ... running")
        t0 = time.perf_counter()
        with _KernelPeak() as peak:
            try:
                papermill.execute_notebook(
                    str(nb), str(out_nb), parameters=nb_params, kernel_name=kernel, cwd=str(repo_root()),
                    progress_bar=False, log_output=False, stdout_file=sys.stdout, stderr_file=sys.stderr,
                )
                error = None
            except Exception as err:  # PapermillExecutionError, a dead kernel, a kernel that never starts, ...
                error = _report_failure(name, err, out_nb)
        seconds = round(time.perf_counter() - t0, 2)
        metrics_path = run_dir / name / "metrics.json"
        entry.update(status="ok" if error is None else "failed", seconds=seconds, output=str(out_nb),
                     peak_rss_mb=peak.mb if peak.usable else _children_peak_rss_mb(),
                     metrics=_key_metrics(metrics_path) if metrics_path.exists() else None,
                     slowest_cells=_slowest_cells(out_nb))
        if error is not None:
            entry["error"] = error
            failed = True
        slow = entry["slowest_cells"][:1]
        _say(f"{name} ... {entry['status']} ({seconds:.1f} s"
             + (f"; slowest cell {slow[0]['cell']}: {slow[0]['seconds']:.1f} s, {slow[0]['source'][:40]!r}" if slow else "")
             + ")")
        # a partial summary survives an interrupted run
        atomic_write_json(summary_path, _refresh_others(summary, summary_path, selected, bool(smoke)) if only else summary)
    if only:
        _refresh_others(summary, summary_path, selected, bool(smoke))
    summary["ok"] = not failed
    summary["seconds"] = round(time.perf_counter() - started, 2)
    done = [e for e in summary["notebooks"].values() if e.get("status") == "ok"]
    summary["notebook_seconds"] = round(sum(float(e.get("seconds") or 0) for e in done), 2)
    summary["peak_rss_mb"] = max([float(e["peak_rss_mb"]) for e in done if e.get("peak_rss_mb")], default=None)
    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(summary_path, summary)
    n_ok = sum(summary["notebooks"][n]["status"] == "ok" for n in selected)
    _say(f"{'done' if not failed else 'stopped'}: {n_ok}/{len(selected)} notebook(s) ok in {summary['seconds']:.1f} s; "
         f"summary: {summary_path}")
    return summary


# --------------------------------------------------------------------------------------------------
# Command line: `crvlm workbook run [...]`
# --------------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
            params[name.strip()] = _parse_value(value)
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
