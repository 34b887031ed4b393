"""``crvlm judge --input FILE.jsonl [--judge NAME] --out FILE.jsonl``: label (prompt, response) rows as refusal or
not with a named judge; each output row is its input row plus ``refused`` and ``confidence``, written atomically."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from crvlm_core.core.errors import InputError

__all__ = ["add_judge_options", "cmd_judge", "read_judge_rows"]

_EXPECTED = 'each line must be a JSON object with string `prompt` and `response` (and optional `id`)'


def add_judge_options(p: argparse.ArgumentParser) -> None:
    from crvlm_core.judges.registry import DEFAULT_JUDGE, JUDGES, LLM_MODEL

    p.add_argument("--input", required=True, help="JSONL rows with `prompt`, `response` and optional `id`")
    p.add_argument("--out", required=True, help="JSONL file to write (the rows plus `refused` and `confidence`)")
    p.add_argument("--judge", default=DEFAULT_JUDGE, choices=list(JUDGES),
                   help=f"which judge (default {DEFAULT_JUDGE}, as crvlm eval; docs/judges.md: accuracy and speed)")
    p.add_argument("--judge-model", default=LLM_MODEL,
                   help=f"model spec of the llm judge, also in the cascade (default {LLM_MODEL})")
    p.add_argument("--samples", type=int, default=0,
                   help="llm judge: 0 = next-token probabilities (default); K > 0 = the K-sample protocol (paper: 5)")
    p.add_argument("--batch-size", type=int, default=4, help="llm judge: prompts per forward")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")


def read_judge_rows(path: Path) -> list[dict]:
    """The rows of a judge input file; one :class:`InputError` line naming the file and line for the first bad row."""
    from crvlm_core.data.schema import _lines

    if not path.is_file():
        raise InputError(f"--input {path}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    rows = []
    for lineno, line in _lines(path):
        where = f"--input {path}:{lineno}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{where}: invalid JSON ({getattr(exc, 'msg', 'nested too deeply')}): {_EXPECTED}") from None
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(rec).__name__}: {_EXPECTED}")
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                what = "missing" if key not in rec else f"not a string ({type(rec[key]).__name__})"
                raise InputError(f"{where}: `{key}` is {what}: {_EXPECTED}")
        if "id" in rec and not isinstance(rec["id"], (str, int)):
            raise InputError(f"{where}: `id` must be a string or an integer: {_EXPECTED}")
        rows.append(rec)
    if not rows:
        raise InputError(f"--input {path}: no rows (empty file): {_EXPECTED}")
    return rows


def cmd_judge(args: argparse.Namespace) -> int:
    """Check --out, read and check every row, build the judge, label the rows, write them atomically."""
    from crvlm_core.core.io import atomic_write_bytes, strict_dumps
    from crvlm_core.judges.base import JudgeError
    from crvlm_core.judges.registry import get_judge

    out = Path(args.out)
    if out.is_dir():
        raise InputError(f"--out {out} is a folder: give a file name")
    if out.exists() and not args.force:
        raise InputError(f"--out {out} exists: give another name or --force to replace it")
    if args.samples < 0 or args.batch_size < 1:
        raise InputError("--samples must be ≥ 0 and --batch-size ≥ 1")
    rows = read_judge_rows(Path(args.input))
    start = time.perf_counter()
    try:
        opts = {"model": args.judge_model, "batch_size": args.batch_size, "samples": args.samples} \
            if args.judge in ("llm", "cascade") else {"batch_size": args.batch_size} if args.judge == "llm-probe" else {}
        judge = get_judge(args.judge, **opts)
        results = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    except JudgeError as err:
        raise InputError(f"--judge {args.judge}: {err}") from None
    lines = [strict_dumps({**r, "refused": v.refused, "confidence": v.confidence}, out, ensure_ascii=False)
             for r, v in zip(rows, results)]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode("utf-8"))
    n = sum(v.refused for v in results)
    print(f"[judge] {args.judge}: {n} of {len(rows)} rows refused, {time.perf_counter() - start:.1f} s → {out}")
    return 0
