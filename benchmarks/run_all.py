"""Run every benchmark, each as its own process under the shared heavy-job lock, then print one table.

    .venv/bin/python benchmarks/run_all.py [--quick] [--model SPEC] [--only capture,generation] [--no-lock]
    make bench            # the same, full sizes

Each script writes ``outputs/bench/<name>.json`` (schema in ``benchmarks/common.py``); the table is built from those
files, so ``--table-only`` reprints it without running anything. ``bench_serve.py`` (written by the serving work)
runs too when present; its JSON is shown from its own fields.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import DEFAULT_MODEL  # noqa: E402

#: name → (script, json name); in run order.
BENCHMARKS = {
    "capture": ("bench_capture.py", "capture"),
    "generation": ("bench_generation.py", "generation"),
    "peers": ("bench_peers.py", "peers"),
    "fitting": ("bench_fitting.py", "fitting"),
    "batching": ("bench_batching.py", "batching"),
    "kl_memory": ("bench_kl_memory.py", "kl_memory"),
    "llava_memory": ("bench_llava_memory.py", "llava_memory"),
    "vision_model": ("bench_vision_model.py", "vision_model"),
    "end_to_end": ("bench_end_to_end.py", "end_to_end"),
    "serve": ("bench_serve.py", "serve"),
    "remote": ("bench_remote.py", "remote"),
}
LOCK = "/tmp/crvlm-heavy.lock"
#: benchmarks that load no model (no lock needed)
LIGHT = {"end_to_end"}


def command(name: str, args: argparse.Namespace) -> list[str]:
    script = HERE / BENCHMARKS[name][0]
    cmd = [sys.executable, "-u", str(script), "--model", args.model]
    if name != "serve":
        if args.quick:
            cmd.append("--quick")
        if args.out:
            cmd += ["--out", args.out]
    if not args.no_lock and name not in LIGHT and shutil.which("flock"):
        cmd = ["flock", LOCK] + cmd
    return cmd


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def rows_of(doc: dict) -> list[dict]:
    """Table rows of one result file: its ``table``, or for a foreign schema (the serve benchmark) its top-level
    numbers and the numbers one level down."""
    if isinstance(doc.get("table"), list):
        return doc["table"]
    rows = []

    def walk(prefix: str, obj, depth: int):
        if isinstance(obj, dict) and depth < 3:
            for k, v in obj.items():
                if k in ("machine", "date", "started", "finished"):
                    continue
                walk(f"{prefix}{k}." if isinstance(v, (dict, list)) else f"{prefix}{k}", v, depth + 1)
        elif isinstance(obj, list) and depth < 3:
            for i, v in enumerate(obj[:8]):
                walk(f"{prefix}{i}.", v, depth + 1)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            rows.append({"metric": prefix.rstrip("."), "value": obj, "unit": "", "goal": None, "met": None})

    walk("", doc, 0)
    return rows[:24]


def format_table(docs: dict[str, dict]) -> str:
    """A Markdown table: benchmark | metric | value | unit | goal | met."""
    lines = ["| benchmark | metric | value | goal | met |", "|---|---|---|---|---|"]
    for name, doc in docs.items():
        for r in rows_of(doc):
            value = _fmt(r.get("value"))
            if r.get("unit") and value not in ("—",) and isinstance(r.get("value"), (int, float)):
                value = f"{value} {r['unit']}"
            met = r.get("met")
            lines.append(f"| {name} | {r.get('metric', '')} | {value} | {r.get('goal') or ''} | "
                         f"{'' if met is None else ('✓' if met else '✗ missed')} |")
    return "\n".join(lines)


def machine_line(docs: dict[str, dict]) -> str:
    for doc in docs.values():
        m = doc.get("machine")
        if isinstance(m, dict) and "cpu_count" in m:
            loads = [d["machine"].get(k) for d in docs.values() if isinstance(d.get("machine"), dict)
                     for k in ("load_average_start", "load_average_end") if d["machine"].get(k)]
            top = max((l[0] for l in loads), default=None)
            return (f"{doc.get('date', '')[:10]}, model {doc.get('model')}, {m.get('cpu_count')} CPUs, "
                    f"{m.get('torch_threads')} torch threads, {m.get('memory_gb', '?')} GB, torch {m.get('torch')}, "
                    f"transformers {m.get('transformers')}, nnsight {m.get('nnsight')}; highest 1-min load average "
                    f"during the runs {top}")
    return ""


def load_results(out: Path, names) -> dict[str, dict]:
    docs = {}
    for name in names:
        path = out / f"{BENCHMARKS[name][1]}.json"
        if path.exists():
            try:
                docs[name] = json.loads(path.read_text())
            except ValueError:
                continue
    return docs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
    p.add_argument("--out", default=None, help="result folder (default outputs/bench)")
    p.add_argument("--no-lock", action="store_true", help="do not wrap each run in flock " + LOCK)
    p.add_argument("--table-only", action="store_true", help="print the table of existing results, run nothing")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    names = [n for n in names if (HERE / BENCHMARKS[n][0]).exists()]
    failed = []
    if not args.table_only:
        for name in names:
            cmd = command(name, args)
            print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            rc = subprocess.call(cmd, cwd=ROOT)
            print(f"[bench] {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
            if rc != 0:
                failed.append(name)
    sys.path.insert(0, str(ROOT))
    from crvlm_core.core.paths import outputs_dir

    out = Path(args.out) if args.out else outputs_dir() / "bench"
    docs = load_results(out, [n for n in names if n not in failed])
    print()
    print(machine_line(docs))
    print(format_table(docs))
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
