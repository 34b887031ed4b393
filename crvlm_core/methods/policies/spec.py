"""A refusal policy file: constraints (data source, refuse/allow, priority) parsed and validated from YAML, and the
one rule that composes them — refuse when a refusing constraint fires and no allowing constraint of higher priority
does — in its hard (:func:`decide`) and soft (:func:`compose_gates`) forms."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml

from crvlm_core.core.fields import int_field, layers_field, number_field
from crvlm_core.data.bundled import list_datasets, load_dataset
from crvlm_core.data.schema import DataError, EmptyDataFile, Sample

__all__ = ["ACTIONS", "DESIGNS", "FIT_DEFAULTS", "Constraint", "Policy", "PolicyError", "PolicyFitConfig",
           "compose_gates", "decide", "load_policy", "parse_policy"]

ACTIONS = ("refuse", "allow")
DESIGNS = ("composed", "union")


class PolicyError(DataError):
    """A policy file that cannot be used; the message names the file and the constraint."""


@dataclass(frozen=True)
class PolicyFitConfig:
    """How a policy is fitted (the ``fit:`` mapping of its file, ``crvlm fit --design``): the ``design``, the
    training and test samples per constraint, the seed, and each CR-VLM calibrator's steered ``layers`` (None: a
    third of the way up), ``epochs``, ``width``, ``lr`` and ``behavioural_epochs`` (0: none)."""

    design: str = "composed"
    n_train: int = 50
    n_test: int = 30
    seed: int = 42
    layers: tuple[int, ...] | None = None
    epochs: int = 40
    width: int = 1024
    lr: float = 3e-4
    behavioural_epochs: int = 1

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise PolicyError(f"fit.design must be one of {DESIGNS}, got {self.design!r}")
        for name, low in (("n_train", 1), ("n_test", 1), ("seed", 0), ("epochs", 1), ("width", 1),
                          ("behavioural_epochs", 0)):
            int_field(self, name, low, prefix="fit.", error=PolicyError)
        number_field(self, "lr", 0.0, strict=True, prefix="fit.", error=PolicyError)  # YAML reads 3e-4 as a string
        layers_field(self, "layers", prefix="fit.", error=PolicyError)

    def to_dict(self) -> dict:
        """The options as JSON (``fit.json``'s ``options``)."""
        d = asdict(self)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d


#: The fit options and their defaults.
FIT_DEFAULTS: dict[str, Any] = PolicyFitConfig().to_dict()


@dataclass(frozen=True)
class Constraint:
    """One constraint: prompts from ``source`` (a bundled dataset name or a JSONL path), restricted to
    ``subjects`` when given, get ``action`` with ``priority`` (higher wins over lower)."""

    name: str
    source: str
    subjects: tuple[str, ...] | None
    action: str
    priority: int

    @property
    def refuses(self) -> bool:
        return self.action == "refuse"

    def data_dict(self) -> dict:
        """The ``data:`` mapping this constraint was parsed from (JSONL paths absolute)."""
        data = {"dataset": self.source} if self.source in list_datasets() else {"jsonl": self.source}
        return {**data, "subjects": list(self.subjects)} if self.subjects else data

    def samples(self) -> list[Sample]:
        return load_dataset(self.source, subjects=list(self.subjects) if self.subjects else None)


@dataclass(frozen=True)
class Policy:
    """A parsed policy: constraints, the default action for prompts no constraint matches (``allow``), fit options
    (``fit:`` in the file) and where its fitted artifact lives (``artifact:``, relative to the file)."""

    name: str
    constraints: tuple[Constraint, ...]
    default: str = "allow"
    fit: dict = field(default_factory=dict, hash=False)
    artifact: Path | None = None
    path: Path | None = None

    def __getitem__(self, name: str) -> Constraint:
        for c in self.constraints:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def refusing(self) -> list[Constraint]:
        return [c for c in self.constraints if c.refuses]

    @property
    def allowing(self) -> list[Constraint]:
        return [c for c in self.constraints if not c.refuses]

    def fit_options(self, **overrides) -> dict:
        """The validated fit options (:class:`PolicyFitConfig`) as a dict: the defaults, the file's ``fit:``, then
        ``overrides`` that are not None."""
        opts = {**self.fit, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return PolicyFitConfig(**opts).to_dict()
        except PolicyError as err:
            raise PolicyError(f"policy {self.name!r}: {err}") from None
        except TypeError:
            raise PolicyError(f"policy {self.name!r}: unknown fit option(s) {sorted(set(opts) - set(FIT_DEFAULTS))}; "
                              f"known: {sorted(FIT_DEFAULTS)}") from None

    def to_dict(self) -> dict:
        return {"name": self.name, "default": self.default, "fit": self.fit,
                "constraints": [{"name": c.name, "data": c.data_dict(), "action": c.action, "priority": c.priority}
                                for c in self.constraints]}


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy YAML file (see ``examples/policy_bio_physics_harmful.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"{path}: no such policy file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PolicyError(f"{path}: not valid YAML: {err}") from None
    return parse_policy(raw, base_dir=path.parent, where=str(path), path=path)


def parse_policy(raw: Any, base_dir: str | Path = ".", where: str = "policy", path: Path | None = None) -> Policy:
    """Validate a policy given as a dict (the YAML's content). Data sources and subjects are checked by loading
    them, so a typo fails here rather than after an hour of fitting.

    Raises:
        PolicyError: naming the file and the constraint.
    """
    base_dir = Path(base_dir)
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: a policy is a mapping with `constraints:` (got {type(raw).__name__})")
    unknown = sorted(set(raw) - {"name", "default", "constraints", "fit", "artifact", "description"})
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {unknown}")
    default = raw.get("default", "allow")
    if default != "allow":
        raise PolicyError(f"{where}: default must be `allow` (prompts no constraint matches are answered); to refuse "
                          "more, add a refusing constraint with that data")
    items = raw.get("constraints")
    if not isinstance(items, list) or not items:
        raise PolicyError(f"{where}: `constraints:` must be a non-empty list")
    constraints, names = [], set()
    for k, item in enumerate(items):
        at = f"{where}: constraint {k + 1}"
        if not isinstance(item, dict):
            raise PolicyError(f"{at}: must be a mapping with name, data, action, priority")
        bad = sorted(set(item) - {"name", "data", "action", "priority", "description"})
        if bad:
            raise PolicyError(f"{at}: unknown key(s) {bad}")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip() or not name.replace("_", "").replace("-", "").isalnum():
            raise PolicyError(f"{at}: `name` must be a non-empty word (letters, digits, - or _), got {name!r}")
        at = f"{where}: constraint {name!r}"
        if name in names:
            raise PolicyError(f"{at}: duplicate name")
        names.add(name)
        action = item.get("action")
        if action not in ACTIONS:
            raise PolicyError(f"{at}: action must be one of {ACTIONS}, got {action!r}")
        priority = item.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise PolicyError(f"{at}: priority must be an integer, got {priority!r}")
        source, subjects = _data_source(item.get("data"), base_dir, at)
        c = Constraint(name, source, subjects, action, priority)
        try:
            n = len(c.samples())
        except DataError as err:
            raise PolicyError(f"{at}: {err}" + (" (empty constraint)" if isinstance(err, EmptyDataFile) else "")) \
                from None
        if n == 0:
            raise PolicyError(f"{at}: its data has no samples (empty constraint)")
        constraints.append(c)
    if not any(c.refuses for c in constraints):
        raise PolicyError(f"{where}: no constraint refuses anything (add one with action: refuse)")
    fit = raw.get("fit") or {}
    if not isinstance(fit, dict):
        raise PolicyError(f"{where}: `fit:` must be a mapping")
    bad = sorted(set(fit) - set(FIT_DEFAULTS))
    if bad:
        raise PolicyError(f"{where}: unknown fit option(s) {bad}; known: {sorted(FIT_DEFAULTS)}")
    artifact = raw.get("artifact")
    policy = Policy(str(raw.get("name") or (path.stem if path else "policy")), tuple(constraints), default, dict(fit),
                    (base_dir / artifact) if artifact else None, path)
    policy.fit_options()  # validates the options
    return policy


def _data_source(data: Any, base_dir: Path, at: str) -> tuple[str, tuple[str, ...] | None]:
    if isinstance(data, str):
        data = {"dataset": data}
    if not isinstance(data, dict):
        raise PolicyError(f"{at}: `data` must be a dataset name or a mapping with dataset|jsonl and subjects")
    bad = sorted(set(data) - {"dataset", "jsonl", "subjects"})
    if bad:
        raise PolicyError(f"{at}: unknown data key(s) {bad}")
    if ("dataset" in data) == ("jsonl" in data):
        raise PolicyError(f"{at}: data needs exactly one of `dataset` (bundled: {', '.join(list_datasets())}) or `jsonl`")
    if "dataset" in data:
        source = str(data["dataset"])
        if source not in list_datasets():
            raise PolicyError(f"{at}: unknown dataset {source!r}; bundled: {', '.join(list_datasets())}")
    else:
        jsonl = base_dir / str(data["jsonl"])
        if not jsonl.is_file():
            raise PolicyError(f"{at}: no such JSONL file {jsonl}")
        source = str(jsonl.resolve())
    subjects = data.get("subjects")
    if subjects is not None:
        if isinstance(subjects, str):
            subjects = [subjects]
        if not isinstance(subjects, list) or not subjects or not all(isinstance(s, str) and s for s in subjects):
            raise PolicyError(f"{at}: subjects must be a non-empty list of names")
        subjects = tuple(subjects)
    return source, subjects


def decide(policy: Policy, fired: Iterable[str]) -> bool:
    """True (refuse) when a refusing constraint fired and no allowing constraint of strictly higher priority did."""
    fired = set(fired)
    unknown = fired - {c.name for c in policy.constraints}
    if unknown:
        raise KeyError(f"unknown constraint(s) {sorted(unknown)}")
    allow_top = max((c.priority for c in policy.allowing if c.name in fired), default=None)
    return any(c.name in fired and (allow_top is None or c.priority >= allow_top) for c in policy.refusing)


def compose_gates(policy: Policy, rho: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Soft form of :func:`decide` for gate values in [0, 1]: each refusing constraint's gate times ``1 − ρ_A`` of
    every allowing constraint ``A`` of higher priority. Equal to :func:`decide` when every ρ is 0 or 1."""
    out = {}
    for c in policy.refusing:
        g = rho[c.name]
        for a in policy.allowing:
            if a.priority > c.priority:
                g = g * (1 - rho[a.name])
        out[c.name] = g
    return out
