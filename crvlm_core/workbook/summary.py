"""What a workbook run records (``summary.json``): each notebook's status, key metrics, slowest cells and its
kernel's peak memory (:class:`KernelPeak`, psutil), failures reported with the failing cell, earlier records kept."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["KernelPeak", "earlier_entries", "finish_summary", "first_code_line", "jsonable", "key_metrics",
           "new_summary", "refresh_others", "report_failure", "slowest_cells"]

_SOURCE_LINES = 8  # lines of a failing cell's source shown in the error report


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def key_metrics(path: Path) -> dict | None:
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


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def report_failure(name: str, err: Exception, executed: Path) -> dict:
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


def slowest_cells(executed: Path, k: int = 3) -> list[dict]:
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
    maximum over the kernels of this process's notebooks, the fallback where no sample was taken."""
    import resource

    kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    return round(kb / 1024, 1)


class KernelPeak:
    """Peak resident memory (MB) of one notebook's kernel: a thread reads the resident set of every process below
    this one (psutil) every ``interval`` seconds while the notebook runs, so each notebook gets its own peak
    (``RUSAGE_CHILDREN`` only keeps the largest since the start). ``mb`` is None when no sample was taken (the
    caller falls back to ``RUSAGE_CHILDREN``)."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        import psutil  # the [notebooks] extra; `crvlm --help` does not need it

        for proc in psutil.Process().children(recursive=True):
            try:
                self.bytes = max(self.bytes, proc.memory_info().rss)
            except psutil.Error:  # gone meanwhile, or not ours to read
                continue

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "KernelPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float | None:
        return round(self.bytes / 2**20, 1) if self.bytes else None

    def peak_mb(self) -> float:
        """:attr:`mb`, or the ``RUSAGE_CHILDREN`` running maximum where no sample was taken."""
        return self.mb if self.mb is not None else _children_peak_rss_mb()


def earlier_entries(summary_path: Path, smoke: bool) -> dict[str, dict]:
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


def refresh_others(summary: dict, summary_path: Path, selected, smoke: bool) -> dict:
    """Take into ``summary`` the records another run has written meanwhile for the notebooks this run does not
    execute: two ``--only`` runs into the same folder at once (say 04 and 05) keep each other's results."""
    for name, entry in earlier_entries(summary_path, smoke).items():
        if name not in selected and name in summary["notebooks"]:
            summary["notebooks"][name] = entry
    return summary



def new_summary(run_name: str, smoke: bool, kernel: str, params: dict, params_file, names: list[str]) -> dict:
    """The summary of a run about to start: every notebook ``pending``."""
    return {"run": run_name, "smoke": bool(smoke), "kernel": kernel, "params": jsonable(params),
            "params_file": str(params_file) if params_file else None, "started": _now(), "finished": None,
            "ok": None, "notebooks": {n: {"status": "pending"} for n in names}}


def finish_summary(summary: dict, failed: bool, started: float) -> dict:
    """Fill in the totals of a finished run: ``ok``, ``seconds`` (this invocation), ``notebook_seconds`` (sum over
    the notebooks that are ok), ``peak_rss_mb`` (the largest of theirs) and ``finished``."""
    summary["ok"] = not failed
    summary["seconds"] = round(time.perf_counter() - started, 2)
    done = [e for e in summary["notebooks"].values() if e.get("status") == "ok"]
    summary["notebook_seconds"] = round(sum(float(e.get("seconds") or 0) for e in done), 2)
    summary["peak_rss_mb"] = max([float(e["peak_rss_mb"]) for e in done if e.get("peak_rss_mb")], default=None)
    summary["finished"] = _now()
    return summary
