"""Benchmark 5 — end to end: wall time and peak RSS of the workbook runs found under ``outputs/<run>/summary.json``
(written by ``crvlm workbook run``; nothing is re-run here). The wall time is the sum of the notebooks' times
(``notebook_seconds``), so a run assembled from several ``--only`` runs of the same folder counts every notebook once. A run counts as *full* when it is not a smoke run and
every notebook ran (none skipped); the smoke row likewise takes only a smoke run of every notebook; peak RSS is read from the summary when the workbook runner records it
(``peak_rss_mb``, overall or per notebook) and reported as missing otherwise. Goals (issue #9): full workbook
≤ 20 min, peak RSS ≤ 4 GB.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import Bench, parser

GOAL_SECONDS = 20 * 60
GOAL_RSS_MB = 4 * 1024


def _peak_rss_mb(summary: dict) -> float | None:
    if summary.get("peak_rss_mb") is not None:
        return float(summary["peak_rss_mb"])
    per = [nb.get("peak_rss_mb") for nb in summary.get("notebooks", {}).values() if isinstance(nb, dict)]
    per = [float(x) for x in per if x is not None]
    return max(per) if per else None


def read_runs(root: Path) -> list[dict]:
    """One record per ``<root>/<run>/summary.json``: run, model, smoke, seconds, notebooks ran/skipped, peak RSS."""
    runs = []
    for path in sorted(root.glob("*/summary.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        nbs = s.get("notebooks", {})
        ran = [k for k, v in nbs.items() if isinstance(v, dict) and v.get("status") == "ok"]
        skipped = [k for k, v in nbs.items() if isinstance(v, dict) and v.get("status") == "skipped"]
        failed = [k for k, v in nbs.items() if isinstance(v, dict) and v.get("status") not in ("ok", "skipped")]
        runs.append({"run": s.get("run", path.parent.name), "model": (s.get("params") or {}).get("MODEL", "default"),
                     "smoke": bool(s.get("smoke")), "ok": bool(s.get("ok")),
                     # notebook by notebook: a run assembled from --only runs of the same folder counts them all
                     "seconds": s.get("notebook_seconds", s.get("seconds")),
                     "carried_over": [k for k in ran if nbs[k].get("carried_over")],
                     "started": s.get("started"), "finished": s.get("finished"), "notebooks_ran": ran,
                     "notebooks_skipped": skipped, "notebooks_failed": failed, "peak_rss_mb": _peak_rss_mb(s),
                     "full": not s.get("smoke") and not skipped and not failed and bool(ran)})
    return runs


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="folder holding the runs (default outputs/)")
    args = p.parse_args(argv)
    from crvlm_core.core.paths import outputs_dir

    root = Path(args.root) if args.root else outputs_dir()
    bench = Bench("end_to_end", args, root=str(root))
    runs = read_runs(root)
    bench.results["runs"] = runs
    for kind, pick in (("full workbook", lambda r: r["full"]), ("smoke workbook", lambda r: r["smoke"] and r["ok"] and not r["notebooks_skipped"])):
        cands = [r for r in runs if pick(r)]
        if not cands:
            bench.add(f"{kind}: wall time", "no run found", "")
            continue
        latest = max(cands, key=lambda r: r.get("finished") or "")
        bench.results[kind.replace(" ", "_")] = latest
        minutes = latest["seconds"] / 60 if latest["seconds"] is not None else None
        full = kind == "full workbook"
        bench.add(f"{kind} ({latest['run']}, {len(latest['notebooks_ran'])} notebooks): wall time", minutes, "min",
                  "≤ 20" if full else None, (minutes <= 20) if full and minutes is not None else None)
        rss = latest["peak_rss_mb"]
        bench.add(f"{kind} ({latest['run']}): peak RSS", rss / 1024 if rss is not None else "not recorded", "GB",
                  "≤ 4" if full else None, (rss <= GOAL_RSS_MB) if full and rss is not None else None)
    bench.write()


if __name__ == "__main__":
    main()
