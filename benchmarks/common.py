"""Shared parts of the benchmark scripts: command-line options, the machine description, median timing, peak-RSS
sampling and the JSON result every script writes to ``outputs/bench/<name>.json``.

Result schema (checked by tests/test_benchmarks.py)::

    {"name": str, "model": str, "quick": bool, "date": ISO-8601 UTC, "seconds": float,
     "machine": {...machine_info()...}, "params": {...}, "results": {...},
     "table": [{"metric": str, "value": float|str|None, "unit": str, "goal": str|None, "met": bool|None}, ...]}

``table`` rows are what ``benchmarks/run_all.py`` prints; ``results`` holds every number measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a clean checkout
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "qwen2.5-0.5b"
SCHEMA_KEYS = ("name", "model", "quick", "date", "seconds", "machine", "params", "results", "table")
ROW_KEYS = ("metric", "value", "unit", "goal", "met")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model spec (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run of the benchmark itself)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    p.add_argument("--out", default=None, help="output folder (default outputs/bench), or a FILE.json")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default %(default)s)")
    return p


def setup_torch(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """CPU count, torch threads, library versions, the platform and the load average now."""
    import torch

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.cuda.is_available(),
    }
    for lib in ("transformers", "nnsight", "peft", "steering_vectors"):
        try:
            from importlib.metadata import version

            info[lib] = version(lib.replace("_", "-"))
        except Exception:
            info[lib] = None
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    return info


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call (CPU time is less disturbed by other jobs sharing the
    cores than wall time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summarize(walls: list[float], cpus: list[float]) -> dict:
    return {"median": statistics.median(walls), "min": min(walls), "max": max(walls), "runs": walls,
            "cpu_median": statistics.median(cpus), "cpu_runs": cpus}


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; median/min/max wall seconds, all runs, and the
    median process CPU seconds."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(max(1, repeats)):
        w, c = timed(fn)
        walls.append(w)
        cpus.append(c)
    return summarize(walls, cpus)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Like :func:`median_time` for several variants, run round-robin (A B C A B C …) so that a change in the load
    of a shared machine falls on every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            w, c = timed(fn)
            walls[name].append(w)
            cpus[name].append(c)
    return {k: summarize(walls[k], cpus[k]) for k in fns}


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_status() -> dict[str, int]:
    """This process's memory now, in bytes (psutil): ``rss`` (resident set), ``file`` (its file-backed and shared
    part, e.g. memory-mapped weights), ``anon`` (the rest: tensors and other anonymous memory) and ``peak`` (the
    resident high-water mark since the process started, ``getrusage``)."""
    import resource

    import psutil

    mem = psutil.Process().memory_info()
    shared = getattr(mem, "shared", 0)  # Linux: file-backed + shared resident pages
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"rss": mem.rss, "file": shared, "anon": mem.rss - shared, "peak": max(peak, mem.rss)}


def anon_bytes() -> int:
    """Resident anonymous memory (tensors, not the model's memory-mapped weight pages, which count in RSS the first
    time a pass touches them)."""
    return memory_status()["anon"]


class PeakRSS:
    """``with PeakRSS() as m: ...`` samples this process's resident memory every ``interval`` s in a thread;
    ``m.peak`` is the highest RSS seen and ``m.delta`` its rise over the RSS at entry (bytes). ``anon=True``
    samples the anonymous part only (:func:`anon_bytes`)."""

    def __init__(self, interval: float = 0.02, anon: bool = False):
        self.interval, self.start, self.peak = interval, 0, 0
        self._read = anon_bytes if anon else rss_bytes
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = self._read()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
        return False

    @property
    def delta(self) -> int:
        return self.peak - self.start


def row(metric: str, value, unit: str = "", goal: str | None = None, met: bool | None = None) -> dict:
    if isinstance(value, float):
        value = round(value, 4)
    return {"metric": metric, "value": value, "unit": unit, "goal": goal, "met": met}


class Bench:
    """Collects one benchmark's results and writes its JSON (atomically) at the end."""

    def __init__(self, name: str, args: argparse.Namespace, **params):
        self.name, self.args = name, args
        self.params = dict(params)
        self.results: dict[str, Any] = {}
        self.table: list[dict] = []
        self.started = time.perf_counter()
        self.date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.load_start = load_average()

    def add(self, metric: str, value, unit: str = "", goal: str | None = None, met: bool | None = None) -> None:
        self.table.append(row(metric, value, unit, goal, met))

    def log(self, msg: str) -> None:
        print(f"[{self.name}] {msg}", flush=True)

    def write(self) -> Path:
        from crvlm_core.core.io import atomic_write_json
        from crvlm_core.core.paths import outputs_dir

        machine = machine_info()
        machine["load_average_start"] = self.load_start
        machine["load_average_end"] = load_average()
        doc = {"name": self.name, "model": self.args.model, "quick": bool(self.args.quick), "date": self.date,
               "seconds": round(time.perf_counter() - self.started, 2), "machine": machine, "params": self.params,
               "results": self.results, "table": self.table}
        out = Path(self.args.out) if self.args.out else outputs_dir() / "bench"
        path = atomic_write_json(out if out.suffix == ".json" else out / f"{self.name}.json", doc)
        self.log(f"wrote {path}")
        return path


def validate_result(doc: dict) -> None:
    """Raise ``ValueError`` if ``doc`` does not follow the schema above."""
    missing = [k for k in SCHEMA_KEYS if k not in doc]
    if missing:
        raise ValueError(f"benchmark result lacks {missing}")
    for key in ("cpu_count", "torch_threads", "torch", "transformers", "nnsight", "load_average_start",
                "load_average_end"):
        if key not in doc["machine"]:
            raise ValueError(f"machine description lacks {key!r}")
    for r in doc["table"]:
        if set(r) != set(ROW_KEYS):
            raise ValueError(f"table row {r} does not have the keys {ROW_KEYS}")


def prompts(n: int, seed: int = 0) -> list:
    """``n`` bundled MMLU samples (half biology, half other subjects), deterministic; scopes assigned."""
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split

    data = assign_scope(load_dataset("mmlu"), in_scope=["biology"])
    per = (n + 1) // 2
    _, test = split(data, n_test=per, seed=seed)
    inn = [s for s in test if s.scope == "in"]
    out = [s for s in test if s.scope == "out"]
    mixed = [s for pair in zip(inn, out) for s in pair]
    return mixed[:n]
