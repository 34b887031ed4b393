"""The workbook's notebooks (``NN_name.ipynb``) and their parameters: a YAML file's common and per-notebook
sections, ``-p NAME=VALUE`` values, and the checks that run before any kernel starts (:class:`WorkbookError`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from crvlm_core.core.paths import repo_root

__all__ = ["RESERVED", "WorkbookError", "check_names", "check_reserved", "check_run_name", "notebooks", "parse_value",
           "read_params_file", "select_notebooks"]

_NB_NAME = re.compile(r"^(\d{2})_[A-Za-z0-9_\-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
RESERVED = frozenset({"RUN", "SMOKE", "OUT_ROOT"})  # set by the runner for every notebook


class WorkbookError(RuntimeError):
    """The workbook could not be started (bad parameters, unknown notebook prefix, no kernel)."""


def notebooks(workbook_dir: str | Path | None = None) -> list[Path]:
    """The workbook notebooks ``NN_name.ipynb`` of ``workbook_dir`` (default ``<repo>/workbook``), sorted by NN.

    Files not named ``NN_name.ipynb`` (checkpoints, scratch notebooks) are ignored.
    """
    folder = Path(workbook_dir) if workbook_dir is not None else repo_root() / "workbook"
    if not folder.is_dir():
        raise WorkbookError(f"no workbook folder at {folder}")
    found = [p for p in folder.glob("*.ipynb") if _NB_NAME.match(p.stem)]
    return sorted(found, key=lambda p: (int(p.stem[:2]), p.stem))


def read_params_file(path: str | Path) -> tuple[dict, dict[str, dict]]:
    """(common parameters, per-notebook parameters) from a YAML file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise WorkbookError(f"cannot read the parameters file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise WorkbookError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise WorkbookError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    per = data.pop("notebooks", None) or {}
    if not isinstance(per, dict) or not all(isinstance(v, dict) for v in per.values()):
        raise WorkbookError(f"{path}: 'notebooks' must map notebook names (e.g. 00_setup_and_data) to parameter mappings")
    return data, {str(k): v for k, v in per.items()}


def check_names(params: dict, where: str) -> None:
    bad = [k for k in params if not isinstance(k, str) or not _IDENT.match(k)]
    if bad:
        raise WorkbookError(f"{where}: parameter names must be Python identifiers, got {bad}")


def parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def check_run_name(run_name: str) -> None:
    if not isinstance(run_name, str) or not _RUN_NAME.match(run_name):
        raise WorkbookError(f"run name must be a plain folder name (letters, digits, . _ -), got {run_name!r}")


def check_reserved(common: dict, params: dict, per_nb: dict[str, dict]) -> None:
    reserved = sorted(RESERVED & (set(common) | set(params) | {k for v in per_nb.values() for k in v}))
    if reserved:
        raise WorkbookError(f"{reserved} are set by the runner: use run_name / smoke / out_root "
                            f"(--run / --smoke / $CRVLM_OUTPUTS) instead")


def select_notebooks(nbs: list[Path], per_nb: dict[str, dict], only: list[str] | None,
                     params_file: str | Path | None) -> set[str]:
    """The names of the notebooks to execute: all, or those whose name starts with an ``only`` prefix; checks that
    the parameters file's ``notebooks`` section names known notebooks."""
    names = [p.stem for p in nbs]
    unknown_nb = sorted(set(per_nb) - set(names))
    if unknown_nb:
        raise WorkbookError(f"{params_file}: 'notebooks' names unknown notebook(s) {unknown_nb}; known: {names}")
    if not only:
        return set(names)
    prefixes = [str(o).strip() for o in only if str(o).strip()]
    missing = [o for o in prefixes if not any(n.startswith(o) for n in names)]
    if missing:
        raise WorkbookError(f"--only {','.join(missing)} matches no notebook; known: {', '.join(names)}")
    return {n for n in names if any(n.startswith(o) for o in prefixes)}
