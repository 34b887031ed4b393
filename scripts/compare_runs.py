"""Compare the metrics of two workbook runs, notebook by notebook: every value of each ``<run>/<notebook>/metrics.json``
flattened to ``key.path[i]`` and compared exactly (floats to 1e-9 relative), timings, throughputs and paths skipped.

    python scripts/compare_runs.py outputs/smoke /elsewhere/outputs/smoke

Prints how many values are equal and each one that differs; exits 1 when any differs, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# keys that measure the machine, not the method (or name where the run lived)
VOLATILE = ("seconds", "time", "tokens_per_second", "throughput", "peak", "rss", "elapsed", "created", "wall", "path",
            "dir", "artifact", "cache", "started", "finished")


def flatten(value, prefix: str = "") -> dict:
    """``{"a": {"b": [1, 2]}}`` → ``{"a.b[0]": 1, "a.b[1]": 2}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def compare(run_a: Path, run_b: Path) -> tuple[int, list[str]]:
    """(number of equal values, one line per difference) over the notebooks of ``run_a``."""
    equal, lines = 0, []
    for folder in sorted(p for p in run_a.iterdir() if (p / "metrics.json").is_file()):
        other = run_b / folder.name / "metrics.json"
        if not other.is_file():
            lines.append(f"{folder.name}: no metrics.json in {run_b}")
            continue
        a = flatten(json.loads((folder / "metrics.json").read_text()))
        b = flatten(json.loads(other.read_text()))
        for key in sorted(set(a) | set(b)):
            if any(word in key.lower() for word in VOLATILE):
                continue
            if same(a.get(key, "<absent>"), b.get(key, "<absent>")):
                equal += 1
            else:
                lines.append(f"{folder.name}: {key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return equal, lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            print(f"compare_runs: error: {run} is not a run folder (outputs/<run>/)", file=sys.stderr)
            return 2
    equal, lines = compare(args.run_a, args.run_b)
    print(f"{equal} values equal, {len(lines)} differ (timings, throughputs and paths skipped)")
    print("\n".join(lines))
    return 1 if lines else 0


if __name__ == "__main__":
    raise SystemExit(main())
