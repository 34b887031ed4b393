"""The plain-vs-framed table of docs/results.md (#25) from ``scripts/measure_framing.py``'s JSON files.

    .venv/bin/python scripts/framing_table.py outputs/framing/biology/*-mb-heldout.json [--part held-out]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cell(row: dict, key: str) -> str:
    value, ci = row.get(key), row.get(f"{key}_ci")
    if value is None:
        return "—"
    return f"{value:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--part", default="held-out")
    args = p.parse_args(argv)
    print("| run | gate plain / framed | plain R | plain ORR | plain MB | framed R | framed ORR | framed MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.files:
        report = json.loads(Path(name).read_text())
        part = report["parts"].get(args.part)
        if not part or "mb_score" not in part.get("plain", {}):
            continue
        plain, framed = part["plain"], part["framed"]
        gate = " / ".join(f"{r['gate']['accuracy']:.2f}" for r in (plain, framed) if "gate" in r) or "—"
        cells = [_cell(r, k) for r in (plain, framed) for k in ("refusal_rate_out", "over_refusal_in", "mb_score")]
        print(f"| {Path(name).stem} ({report['date'][:16]}) | {gate} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
