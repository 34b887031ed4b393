"""What ``crvlm fit`` / ``crvlm eval`` check and choose before any work: the data (which part of which source, the
subjects of ``--in-scope``), ``--out``, and — right after the model loads — the layers and prompt lengths against that
model. Every failure is one :class:`~crvlm_core.core.errors.InputError` line naming the option or file."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

from crvlm_core.cli.options import parse_layers
from crvlm_core.core.errors import InputError

__all__ = ["check_layers", "check_out_folder", "deferred_interrupt", "fit_split", "eval_split",
           "scoped_data", "same_source"]


def _is_file_source(source: str) -> bool:
    from crvlm_core.data.bundled import list_datasets

    return source not in list_datasets()


def same_source(a: str | None, b: str | None) -> bool:
    """Whether two ``--train`` / ``--test`` values name the same data: the same bundled name, or the same file."""
    if not a or not b:
        return False
    if not _is_file_source(a) or not _is_file_source(b):
        return a == b
    return Path(a).resolve() == Path(b).resolve()


def fit_split(split: str | None, train: str) -> str:
    """``crvlm fit``'s part of ``--train``: the option, else the train half of a bundled dataset (its test half is
    eval's default) and all of a JSONL file of your own (evaluate on another file)."""
    return split or ("all" if _is_file_source(train) else "train")


def eval_split(split: str | None, test: str, fit: dict) -> str:
    """``crvlm eval``'s part of ``--test``: the option, else the test half when ``--test`` is the source the artifact
    was fitted on with its train half (or, with no artifact, a bundled dataset: the half fitted artifacts are scored
    on), else all of it — data the fit never saw."""
    if split:
        return split
    if fit.get("train"):
        same, fitted = same_source(test, fit["train"]), fit.get("split", "train")
        if same and fitted != "train":
            print(f"[eval] note: --test {test} is the data the artifact was fitted on ({fitted}): in-sample; give "
                  "another --test for held-out numbers")
        return "test" if same and fitted == "train" else "all"
    return "all" if _is_file_source(test) else "test"


def _check_subjects(samples: list, source: str, in_scope: list[str], out_scope: list[str]) -> None:
    present = sorted({s.subject for s in samples})
    for option, names in (("--in-scope", in_scope), ("--out-scope", out_scope)):
        unknown = [n for n in names if n not in present]
        if unknown:
            where = f"{source} has no samples" if not samples else f"available in {source}: {', '.join(present)}"
            raise InputError(f"{option}: unknown subject(s) {', '.join(unknown)} ({where})")


def scoped_data(source: str, in_scope: list[str], out_scope: list[str], part: str, n: int | None, seed: int,
                label: str = "data") -> list:
    """The samples of ``source`` tagged in / out of scope, the ``part`` (train / test half, or all) of them, at most
    ``n`` per scope; prints how many of each scope are used."""
    from crvlm_core.data.bundled import load_dataset
    from crvlm_core.data.splits import assign_scope, split, take_per_scope

    samples = load_dataset(source)
    _check_subjects(samples, source, in_scope, out_scope)
    if in_scope or out_scope:
        samples = assign_scope(samples, in_scope=in_scope, out_scope=out_scope or None)
    if part != "all":
        train, test = split(samples, n_train=None, n_test=None, test_fraction=0.5, seed=seed)
        samples = train if part == "train" else test
    chosen = samples[:] if n is None else take_per_scope(samples, n)
    n_in, n_out = sum(s.scope == "in" for s in chosen), sum(s.scope == "out" for s in chosen)
    print(f"[{label}] {source} ({part if part == 'all' else part + ' half'}): {n_out} out-of-scope / {n_in} in-scope "
          "samples")
    return chosen


def check_out_folder(out: str) -> Path:
    """``crvlm eval --out``: a folder (absent, or existing: its metrics.json / samples.jsonl are replaced), not a file.
    Checked before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: choose another --out")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {out}: {parent} is a file, not a folder: choose another --out")
            break
    return path


def check_layers(handle, **options: str | None) -> None:
    """Right after the model loads: every layer of each ``--option`` (``layers="3-5"``, ``gate_layer="7"``) is one
    of the model's decoder layers."""
    for name, text in options.items():
        if text is None or text in ("auto", "none"):
            continue
        option = "--" + name.replace("_", "-")
        bad = [layer for layer in parse_layers(text, option) if layer >= handle.n_layers]
        if bad:
            raise InputError(f"{option} {text}: layer {bad[0]} out of range: {handle.spec} has {handle.n_layers} "
                             f"decoder layers (0..{handle.n_layers - 1})")


def _hold(signum, frame):  # noqa: ARG001 (signal handler signature)
    _hold.pending = True


@contextmanager
def deferred_interrupt():
    """Hold Ctrl-C while output files are written (so metrics.json and samples.jsonl are written as a pair); an
    interrupt during the write is raised after it, as ``KeyboardInterrupt("written")``."""
    try:
        previous = signal.signal(signal.SIGINT, _hold)
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    _hold.pending = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if _hold.pending:
        raise KeyboardInterrupt("written")
