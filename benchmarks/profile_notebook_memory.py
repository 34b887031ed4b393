"""Memory profile of one workbook notebook, cell by cell: where its peak resident memory comes from.

    .venv/bin/python benchmarks/profile_notebook_memory.py 06 [--run memprofile] [--param N_TEST=4 ...]

The notebook's code cells run in this process, in order, with the parameters injected after its ``parameters`` cell
as papermill does (``MODEL``, ``RUN``, then every ``--param``). A thread samples the memory (psutil) every 50 ms and
splits the resident set into anonymous memory (tensors, Python objects) and file-backed pages (the memory-mapped
safetensors weights, shared with the page cache and dropped under pressure), so a peak can be attributed to a cell
and to a kind of memory. Writes ``outputs/bench/memory_<NN>.json`` (the benchmark schema of ``common.py``).

Run it under the heavy-job lock like the other benchmarks. With ``--run`` other than the workbook's run folder the
notebook writes its outputs there, so a profile does not overwrite the workbook's results; a notebook that reads an
earlier notebook's artifacts (05) needs the run folder that holds them.
"""

from __future__ import annotations

import os
import threading
import time

from common import ROOT, Bench, memory_status, parser, setup_torch

FIELDS = ("rss", "anon", "file")


def status_mb() -> dict[str, float]:
    """Resident, anonymous and file-backed memory of this process now (MB), from :func:`common.memory_status`."""
    status = memory_status()
    return {k: status[k] / 2**20 for k in FIELDS}


class Sampler:
    """Samples :func:`status_mb` in a thread; ``take()`` returns the peaks since the last ``take()`` and resets them."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self._lock = threading.Lock()
        self._peak = status_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = status_mb()
            with self._lock:
                self._peak = {k: max(v, self._peak.get(k, 0.0)) for k, v in now.items()}

    def take(self) -> dict[str, float]:
        now = status_mb()
        with self._lock:
            peak = {k: max(v, self._peak.get(k, 0.0)) for k, v in now.items()}
            self._peak = now
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def notebook_cells(prefix: str, params: dict) -> tuple[str, list[str]]:
    """(notebook name, code cells) with the overrides appended to the ``parameters`` cell."""
    import nbformat

    matches = sorted((ROOT / "workbook").glob(f"{prefix}*.ipynb"))
    if len(matches) != 1:
        raise SystemExit(f"notebook prefix {prefix!r} matches {[m.name for m in matches]}")
    nb = nbformat.read(matches[0], as_version=4)
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        src = cell.source
        if "parameters" in cell.metadata.get("tags", []):
            src += "\n# injected\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
        cells.append(src)
    return matches[0].stem, cells


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("notebook", help="notebook prefix, e.g. 06")
    p.add_argument("--run", default="memprofile", help="run folder under outputs/ (default %(default)s)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="notebook parameter (VALUE parsed as YAML); repeatable")
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    setup_torch(args.threads)
    import yaml

    from crvlm_core.workbook.summary import first_code_line

    params = {"MODEL": args.model, "RUN": args.run}
    if args.quick:
        params["SMOKE"] = True
    for item in args.param:
        name, _, value = item.partition("=")
        params[name] = yaml.safe_load(value)
    name, cells = notebook_cells(args.notebook, params)
    bench = Bench(f"memory_{args.notebook}", args, notebook=name, params=params)
    sampler = Sampler()
    ns: dict = {"__name__": "__main__"}
    rows = []
    try:
        for i, src in enumerate(cells):
            start = status_mb()
            t0 = time.perf_counter()
            exec(compile(src, f"<{name} cell {i}>", "exec"), ns)
            peak, end = sampler.take(), status_mb()
            first = first_code_line(src)
            rows.append({"cell": i, "first_line": first[:80], "seconds": round(time.perf_counter() - t0, 2),
                         "rss_start_mb": round(start["rss"], 1), "rss_peak_mb": round(peak["rss"], 1),
                         "anon_peak_mb": round(peak["anon"], 1), "file_peak_mb": round(peak["file"], 1),
                         "rss_end_mb": round(end["rss"], 1), "anon_end_mb": round(end["anon"], 1)})
            bench.log(f"cell {i:2d} {rows[-1]['seconds']:8.1f} s  peak RSS {peak['rss']:7.0f} MB "
                      f"(anon {peak['anon']:6.0f}, file {peak['file']:6.0f})  {first[:50]}")
    finally:
        sampler.stop()
        bench.results["cells"] = rows
        if rows:
            top = max(rows, key=lambda r: r["rss_peak_mb"])
            bench.results["peak"] = top
            bench.add(f"{name}: peak RSS", top["rss_peak_mb"] / 1024, "GB", "≤ 4", top["rss_peak_mb"] <= 4096)
            bench.add(f"{name}: peak cell's highest anonymous memory", top["anon_peak_mb"] / 1024, "GB")
            bench.add(f"{name}: peak cell's highest file-backed memory (mapped weights)", top["file_peak_mb"] / 1024, "GB")
            bench.add(f"{name}: peak cell", f"{top['cell']}: {top['first_line']}")
            bench.add(f"{name}: cells completed", f"{len(rows)} of {len(cells)}")
        bench.write()


if __name__ == "__main__":
    main()
