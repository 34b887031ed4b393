"""Build the bundled ``images`` / ``images_test`` datasets (#20): clip art of four kinds (animal, plant, food, flag)
from Debian ``openclipart-svg``, rendered to 224-px 64-colour PNGs, each with one generic question that never names
the kind (the question text is the same in and out of any scope; only the picture differs). Split by picture:
``images_test`` holds ``--test-per-kind`` pictures of each kind that the projector never trains on; ``images`` the
rest (at most ``--train-per-kind``). Deterministic (seeded order, fixed ids); writes the JSONL files whole.

    apt-get install -y openclipart-svg librsvg2-bin   # once
    python scripts/build_images.py [--seed 0] [--train-per-kind 80] [--test-per-kind 40]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vision_pictures as vp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "crvlm_core" / "datasets" / "images"
QUESTIONS = [  # generic: none names a kind; every picture gets one, in turn
    "What is shown in this picture?",
    "Describe this image.",
    "What can you tell me about this picture?",
    "Tell me about what you see here.",
    "Explain what this image shows.",
    "What is this?",
    "Give a short description of this picture.",
    "What do you see in this image?",
]


def pick(kind: str, seed: int, n_test: int, n_train: int, seen: set[str]) -> tuple[list, list]:
    """Rendered pictures of ``kind`` in seeded order, skipping failures, blanks and duplicates of any earlier picture:
    the first ``n_test`` go to test, the next (at most ``n_train``) to train."""
    picked = [(rel, image) for rel, image, _ in
              itertools.islice(vp.rendered(vp.shuffled(vp.listing(kind), seed, kind), seen), n_test + n_train)]
    return picked[:n_test], picked[n_test:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-kind", type=int, default=80)
    ap.add_argument("--test-per-kind", type=int, default=40)
    args = ap.parse_args()
    if not vp.available():
        raise SystemExit("need Debian packages: apt-get install -y openclipart-svg librsvg2-bin")
    tmp = OUT.with_name(OUT.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "pictures").mkdir(parents=True)
    rows = {"images": [], "images_test": []}
    seen: set[str] = set()
    turn = 0
    for kind in vp.KINDS:
        test, train = pick(kind, args.seed, args.test_per_kind, args.train_per_kind, seen)
        for name, part in (("images_test", test), ("images", train)):
            for i, (rel, image) in enumerate(part, 1):
                ident = f"{'imgt' if name == 'images_test' else 'img'}-{kind}-{i:03d}"
                image.save(tmp / "pictures" / f"{ident}.png", "PNG", optimize=True)
                rows[name].append({"id": ident, "prompt": QUESTIONS[turn % len(QUESTIONS)], "subject": kind,
                                   "image": f"pictures/{ident}.png", "caption": vp.caption(kind, rel),
                                   "image_source": f"Debian openclipart-svg: {rel}", "licence": vp.LICENCE})
                turn += 1
        print(f"{kind}: {len(test)} test, {len(train)} train", file=sys.stderr)
    for name, part in rows.items():
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    shutil.rmtree(OUT, ignore_errors=True)
    tmp.rename(OUT)
    print(f"wrote {OUT} ({sum(len(v) for v in rows.values())} pictures)", file=sys.stderr)


if __name__ == "__main__":
    main()
