"""Pictures whose content is known, for the vision model (#20): Debian ``openclipart-svg`` clip art (public domain)
listed by folder, rendered with ``rsvg-convert`` (Debian ``librsvg2-bin``) onto a white 224-px square, with a kind
(animal / plant / food / flag, or ``other`` for the projector's extra pictures) and a caption from the folder and file
names. Used by ``build_images.py`` (the bundled ``images`` dataset) and ``train_projector.py``.

    apt-get install -y openclipart-svg librsvg2-bin   # once
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import subprocess
from pathlib import Path

from PIL import Image

OPENCLIPART = Path("/usr/share/openclipart/svg")
SIDE = 224
COLOURS = 64
LICENCE = "public domain (Open Clip Art Library dedication; Debian openclipart-svg 1:0.18+dfsg)"

# kind -> (folders, folder parts that exclude a file, file-name words that exclude a file)
KINDS = {
    "animal": (["animals"], {"fantasy"}, {"logo", "sign", "icon", "button", "footprint", "paw", "track", "skeleton",
                                         "bone", "silhouette", "orme"}),
    "plant": (["plants"], set(), {"logo", "sign", "icon", "button", "frame", "border", "pattern"}),
    "food": (["food"], set(), {"logo", "sign", "icon", "button", "menu", "label", "restaurant", "cutlery", "fork",
                               "knife", "spoon", "plate"}),
    "flag": (["signs_and_symbols/flags"], {"semaphore", "miscellany", "pirates"},
             {"map", "signalflag", "signal", "pennant", "semaphore", "button", "icon", "banner", "waving", "pole", "route"}),
}
# Everything else the projector may see (captioned by folder): pictures that are none of the four kinds.
OTHER_FOLDERS = {"transportation": "a vehicle", "buildings": "a building", "tools": "a tool",
                 "electronics": "an electronic device", "office": "an office object", "recreation": "a leisure object",
                 "people": "a person", "containers": "a container", "computer": "a computer object"}
_SUB = {"mammals": "a mammal", "birds": "a bird", "fish": "a fish", "bugs": "an insect", "amphibian": "an amphibian",
        "dinosaurs": "a dinosaur", "trees": "a tree", "flowers": "a flower", "fruit": "fruit", "vegetables": "a vegetable",
        "dairy": "a dairy food", "beverages": "a drink", "breads_and_carbs": "bread", "desserts": "a dessert",
        "meats_and_eggs": "meat or eggs"}
_ARTICLE = {"animal": "an animal", "plant": "a plant", "food": "food"}
_AUTHOR_TAIL = re.compile(r"(_[a-z]+_[a-z]{1,6})?(_\d+)?$")


def available() -> bool:
    return shutil.which("rsvg-convert") is not None and OPENCLIPART.is_dir()


def _words(path: Path) -> set[str]:
    return set(re.split(r"[^a-z]+", path.stem.lower()))


def listing(kind: str) -> list[Path]:
    """The SVG files of ``kind`` (paths relative to the openclipart folder), sorted."""
    if kind == "other":
        return sorted(p.relative_to(OPENCLIPART) for f in OTHER_FOLDERS for p in (OPENCLIPART / f).rglob("*.svg"))
    folders, skip_parts, skip_words = KINDS[kind]
    out = []
    for folder in folders:
        for p in (OPENCLIPART / folder).rglob("*.svg"):
            rel = p.relative_to(OPENCLIPART)
            if set(rel.parts[:-1]) & skip_parts or _words(rel) & skip_words:
                continue
            out.append(rel)
    return sorted(out)


def render(rel: Path) -> Image.Image | None:
    """The picture on a white ``SIDE``-px square (aspect kept, centred, ``COLOURS`` colours); None where it fails or is nearly blank."""
    try:
        png = subprocess.run(["rsvg-convert", "-w", str(SIDE), "-h", str(SIDE), "-a", "-b", "white",
                              str(OPENCLIPART / rel)], check=True, capture_output=True, timeout=60).stdout
        image = Image.open(io.BytesIO(png)).convert("RGB")
    except (subprocess.SubprocessError, OSError):
        return None
    canvas = Image.new("RGB", (SIDE, SIDE), "white")
    canvas.paste(image, ((SIDE - image.width) // 2, (SIDE - image.height) // 2))
    grey = canvas.convert("L")
    if sum(1 for v in grey.getdata() if v < 240) < 0.02 * SIDE * SIDE:
        return None  # nearly blank (white on white, or a hairline drawing)
    return canvas.quantize(COLOURS).convert("RGB")  # as bundled: 64-colour PNGs (clip art loses nothing visible)


def rendered(paths, seen: set[str]):
    """``(path, image, sha256 of its pixels)`` of each path that renders, in order, skipping failures, blanks and
    repeats of a picture in ``seen`` (which it updates); lazy, so a caller that stops early renders no more."""
    for rel in paths:
        image = render(rel)
        if image is None:
            continue
        sha = hashlib.sha256(image.tobytes()).hexdigest()
        if sha in seen:
            continue
        seen.add(sha)
        yield rel, image, sha


def title(rel: Path) -> str:
    """A readable title from the file name: the author tail and numbering removed, underscores to spaces."""
    stem = rel.stem.lower().replace("-", "_")
    stem = _AUTHOR_TAIL.sub("", stem) or stem
    return " ".join(w for w in stem.split("_") if w and not w.isdigit())


def caption(kind: str, rel: Path) -> str:
    """A short caption from the folders (and a flag's file name): "a drawing of a bird", "the flag of Angola".
    Other file names are left out: many end in an author's name that cannot be told from the title reliably."""
    parts = rel.parts[:-1]
    if kind == "flag":  # files in a continent or country folder are named after the country or region
        return f"the flag of {title(rel).title()}" if len(parts) >= 3 else "a flag"
    if kind == "other":
        return f"a drawing of {OTHER_FOLDERS[parts[0]]}"
    return "a drawing of " + next((_SUB[p] for p in reversed(parts) if p in _SUB), _ARTICLE[kind])


def shuffled(paths: list[Path], seed: int, kind: str) -> list[Path]:
    out = list(paths)
    random.Random(f"{seed}:{kind}").shuffle(out)
    return out
