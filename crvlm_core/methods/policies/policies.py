"""Composable refusal policies: a YAML file of constraints (data source, refuse/allow, priority), composed by one
rule — refuse when a refusing constraint fires and no allowing constraint of higher priority does — fitted with
CR-VLM calibrators and evaluated per constraint and jointly.

Two designs (measured in ``workbook/07_policies.ipynb``, see README "Policies"):

* ``composed`` (default): one CR-VLM calibrator per refusing constraint (its data against what the policy allows)
  and a logistic gate head per allowing constraint, all read from the same prefill summary; at inference each
  refusing calibrator's gate is multiplied by ``1 − ρ`` of every allowing constraint of higher priority (the rule,
  exact when the gates are 0/1). Priorities can change without refitting.
* ``union``: one calibrator trained on "refused vs allowed" with every constraint's data labelled by the rule.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import yaml

from crvlm_core.data.samples import DataError, Sample, list_datasets, load_dataset, split
from crvlm_core.core.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, sha256_hex
from crvlm_core.metrics import mb_score, rate
from crvlm_core.models.loading import ModelHandle
from crvlm_core.steer.interventions import PrefillGate

__all__ = ["ACTIONS", "DESIGNS", "Constraint", "Policy", "PolicyError", "PolicyData", "PolicySteering",
           "load_policy", "parse_policy", "decide", "compose_gates", "policy_data", "fit_policy",
           "load_policy_steering", "policy_metrics", "evaluate_policy", "fitted_artifact", "is_policy_artifact"]

ACTIONS = ("refuse", "allow")
DESIGNS = ("composed", "union")
POLICY_JSON = "policy.json"
POLICY_YAML = "policy.yaml"
FIT_DEFAULTS: dict[str, Any] = {"design": "composed", "n_train": 50, "n_test": 30, "seed": 42, "layers": None,
                                "epochs": 40, "width": 1024, "lr": 3e-4, "behavioural_epochs": 1}


class PolicyError(DataError):
    """A policy file that cannot be used; the message names the file and the constraint."""


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
        opts = {**FIT_DEFAULTS, **self.fit, **{k: v for k, v in overrides.items() if v is not None}}
        if opts["design"] not in DESIGNS:
            raise PolicyError(f"policy {self.name!r}: fit.design must be one of {DESIGNS}, got {opts['design']!r}")
        return opts

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
            raise PolicyError(f"{at}: {err}") from None
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
    policy.fit_options()  # validates the design
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


# ------------------------------------------------------------------------------------------------------------------
# The composition rule
# ------------------------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class PolicyData:
    """Train/test samples of every constraint, each with ``scope`` = ``out`` (the policy refuses it) or ``in``,
    and ``membership``: sample id → names of the constraints whose data holds it."""

    train: list[Sample]
    test: list[Sample]
    membership: dict[str, set[str]]

    def of(self, part: str, name: str) -> list[Sample]:
        return [s for s in getattr(self, part) if name in self.membership[s.id]]


def policy_data(policy: Policy, n_train: int, n_test: int, seed: int = 42) -> PolicyData:
    """Seeded ``n_train`` + ``n_test`` samples per constraint (fewer when its data is smaller: half each), labelled
    by the rule over every constraint whose data holds the same sample."""
    membership: dict[str, set[str]] = {}
    per: dict[str, tuple[list[Sample], list[Sample]]] = {}
    for c in policy.constraints:
        samples = c.samples()
        for s in samples:
            membership.setdefault(s.id, set()).add(c.name)
        tagged = [replace(s, scope="out") for s in samples]  # one stratum: the split's counts apply per constraint
        if len(tagged) < n_train + n_test:
            raise PolicyError(f"constraint {c.name!r}: {len(tagged)} samples, fewer than n_train + n_test = "
                              f"{n_train + n_test}")
        per[c.name] = split(tagged, n_train=n_train, n_test=n_test, seed=seed)
    train_ids = {s.id for tr, _ in per.values() for s in tr}

    def labelled(samples: Iterable[Sample], skip: set[str]) -> list[Sample]:
        seen, out = set(skip), []
        for s in samples:
            if s.id not in seen:
                seen.add(s.id)
                out.append(replace(s, scope="out" if decide(policy, membership[s.id]) else "in"))
        return out

    train = labelled((s for tr, _ in per.values() for s in tr), set())
    test = labelled((s for _, te in per.values() for s in te), train_ids)
    return PolicyData(train, test, membership)


# ------------------------------------------------------------------------------------------------------------------
# The composed intervention
# ------------------------------------------------------------------------------------------------------------------


class PolicySteering(PrefillGate):
    """Design ``composed``: refusing calibrators and allowing gate heads on one prefill summary, combined by
    :func:`compose_gates`. ``last_gates`` keeps the raw and composed gate values of the last batch."""

    def __init__(self, policy: Policy, calibrators: Mapping[str, Any], heads: Mapping[str, torch.nn.Linear],
                 gate_layer: int):
        self.policy = policy
        self.steerings = dict(calibrators)  # name → CalibratedSteering
        self.calibrators = torch.nn.ModuleDict({n: s.calibrator for n, s in calibrators.items()})
        self.heads = torch.nn.ModuleDict(dict(heads))
        self.gate_layer = int(gate_layer)
        self.rule = tuple((c.name, c.action, c.priority) for c in policy.constraints)
        self.layers = tuple(sorted({l for s in calibrators.values() for l in s.layers}))
        if any(s.gate_layer != self.gate_layer for s in calibrators.values()):
            raise ValueError("every refusing calibrator of a composed policy must read the same gate layer")
        self.last_gates: dict[str, torch.Tensor] = {}

    def validate(self, handle: ModelHandle) -> None:
        for s in self.steerings.values():
            s.validate(handle)
        super().validate(handle)

    @torch.no_grad()
    def gates(self, summary: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw gate value of every constraint for prefill summaries ``[batch, d]``."""
        rho = {}
        for name, s in self.steerings.items():
            rho[name] = torch.stack(list(s.calibrator.gate_values(summary).values())).mean(0)
        for name, head in self.heads.items():
            rho[name] = torch.sigmoid(head(summary.to(head.weight.dtype))).squeeze(-1)
        return rho

    def set_gate(self, summary: torch.Tensor) -> None:
        rho = self.gates(summary)
        composed = compose_gates(self.policy, rho)
        self.last_gates = {**{f"raw:{k}": v for k, v in rho.items()}, **{f"composed:{k}": v for k, v in composed.items()}}
        for name, s in self.steerings.items():
            s.calibrator.set_gate_override({l: composed[name].clamp(0, 1) for l in s.layers})

    def clear_gate(self) -> None:
        for s in self.steerings.values():
            s.calibrator.clear_gate_override()

    def apply(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        for s in self.steerings.values():
            if layer in s.layers:
                hidden = s.calibrator.apply_hidden(layer, hidden)
        return hidden


def _fit_head(x_pos: torch.Tensor, x_neg: torch.Tensor, seed: int) -> torch.nn.Linear:
    """Logistic regression (standardised, L2) of a constraint's prefill summaries against the others', folded into
    one Linear on raw summaries."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([x_pos, x_neg]).double()
    y = torch.cat([torch.ones(len(x_pos)), torch.zeros(len(x_neg))]).numpy()
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    clf = LogisticRegression(C=0.1, max_iter=5000, random_state=seed).fit(((x - mean) / scale).numpy(), y)
    w = torch.as_tensor(clf.coef_[0]) / scale
    head = torch.nn.Linear(x.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(w.float()[None])
        head.bias.fill_(float(clf.intercept_[0] - (w * mean).sum()))
    head.requires_grad_(False)
    return head


# ------------------------------------------------------------------------------------------------------------------
# Fitting, saving, loading
# ------------------------------------------------------------------------------------------------------------------


def _fit_calibrated(handle, train, opts, out_dir: Path, progress: bool):
    from crvlm_core.methods.crvlm.steering import finetune_behavioural, fit_crvlm

    steering = fit_crvlm(handle, train, layers=opts["layers"], gate_layer="auto", width=opts["width"],
                         epochs=opts["epochs"], lr=opts["lr"], seed=opts["seed"], out_dir=out_dir, progress=progress)
    if opts["behavioural_epochs"] > 0:
        finetune_behavioural(steering, handle, train, epochs=opts["behavioural_epochs"], seed=opts["seed"],
                             progress=progress)
    steering.save(out_dir)
    return steering


def _fit_key(handle: ModelHandle, policy: Policy, opts: dict, data: PolicyData) -> str:
    from crvlm_core.data.samples import fingerprint

    return sha256_hex(json.dumps({"model": handle.key, "policy": policy.to_dict()["constraints"],
                                  "opts": {k: v for k, v in opts.items() if k != "n_test"},
                                  "train": fingerprint(data.train)}, sort_keys=True, default=str))[:16]


def fit_policy(handle: ModelHandle, policy: Policy, out_dir: str | Path, progress: bool = True, reuse: bool = True,
               **overrides) -> tuple[Any, dict]:
    """Fit what ``policy`` needs with its ``fit:`` options (``overrides`` win) and save it as a ``crvlm fit``
    artifact folder (``fit.json`` with ``method: policy``, the policy, the calibrators and gate heads).

    With ``reuse`` an artifact fitted from the same model, constraints, options and training data is loaded
    instead of refitted.

    Returns:
        ``(intervention, fit_summary)``: a :class:`PolicySteering` (``composed``) or a ``CalibratedSteering``
        (``union``).
    """
    from crvlm_core.cli.main import FIT_JSON

    opts = policy.fit_options(**overrides)
    out = Path(out_dir)
    data = policy_data(policy, opts["n_train"], opts["n_test"], opts["seed"])
    key = _fit_key(handle, policy, opts, data)
    if reuse and (out / FIT_JSON).exists():
        fit = json.loads((out / FIT_JSON).read_text())
        if fit.get("key") == key:
            return load_policy_steering(out, handle), fit
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    if opts["design"] == "union":
        t = time.perf_counter()
        steering = _fit_calibrated(handle, data.train, opts, out / "union", progress)
        seconds["union"] = time.perf_counter() - t
    else:
        from crvlm_core.methods.crvlm.steering import default_gate_layer
        from crvlm_core.extract import extract

        allowed = [s for s in data.train if s.scope == "in"]
        if not allowed:
            raise PolicyError(f"policy {policy.name!r}: no training sample is allowed: the refusing calibrators need "
                              "data to answer (add an allowing constraint)")
        cals = {}
        for c in policy.refusing:
            t = time.perf_counter()
            own = [replace(s, scope="out") for s in data.of("train", c.name)]
            cals[c.name] = _fit_calibrated(handle, own + allowed, opts, out / "constraints" / c.name, progress)
            seconds[c.name] = time.perf_counter() - t
        gate_layer = default_gate_layer(handle)
        heads = {}
        if policy.allowing:
            acts = extract(handle, data.train, layers=[gate_layer], progress=progress, desc="gate summaries")
            summary = acts.at(gate_layer)
            for c in policy.allowing:
                t = time.perf_counter()
                pos = torch.tensor([c.name in data.membership[s.id] for s in data.train])
                heads[c.name] = _fit_head(summary[pos], summary[~pos], opts["seed"])
                atomic_save_safetensors(out / "constraints" / c.name / "head.safetensors",
                                        {"weight": heads[c.name].weight.detach(), "bias": heads[c.name].bias.detach()})
                seconds[c.name] = time.perf_counter() - t
        steering = PolicySteering(policy, cals, heads, gate_layer)
    atomic_write_bytes(out / POLICY_YAML, yaml.safe_dump(policy.to_dict(), sort_keys=False).encode())
    fit = {"method": "policy", "design": opts["design"], "model": handle.spec, "policy": policy.name, "key": key,
           "options": opts, "fit_seconds": time.perf_counter() - start, "fit_seconds_by_part": seconds,
           "n_train": {c.name: len(data.of("train", c.name)) for c in policy.constraints},
           "layers": list(steering.layers), "gate_layer": steering.gate_layer,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(out / FIT_JSON, fit)
    return steering, fit


def load_policy_steering(artifact: str | Path, handle: ModelHandle | None = None):
    """The intervention a ``crvlm fit --policy`` folder describes, checked against ``handle`` when given."""
    from safetensors.torch import load_file

    from crvlm_core.methods.crvlm.steering import load_calibrated
    from crvlm_core.cli.main import FIT_JSON

    artifact = Path(artifact)
    fit = json.loads((artifact / FIT_JSON).read_text())
    if fit.get("method") != "policy":
        raise PolicyError(f"{artifact}: not a policy artifact (method {fit.get('method')!r})")
    policy = parse_policy(yaml.safe_load((artifact / POLICY_YAML).read_text()), where=str(artifact / POLICY_YAML))
    if fit["design"] == "union":
        steering = load_calibrated(artifact / "union")
    else:
        cals = {c.name: load_calibrated(artifact / "constraints" / c.name) for c in policy.refusing}
        heads = {}
        for c in policy.allowing:
            t = load_file(str(artifact / "constraints" / c.name / "head.safetensors"))
            head = torch.nn.Linear(t["weight"].shape[1], 1)
            head.load_state_dict(t)
            heads[c.name] = head.requires_grad_(False)
        steering = PolicySteering(policy, cals, heads, fit["gate_layer"])
    if handle is not None:
        steering.validate(handle)
    return steering


def is_policy_artifact(path: str | Path | None) -> bool:
    """Whether ``path`` is a folder written by ``crvlm fit --policy``."""
    fit = Path(path) / "fit.json" if path else None
    return bool(fit and fit.exists() and json.loads(fit.read_text()).get("method") == "policy")


def fitted_artifact(policy_path: str | Path) -> Path:
    """The artifact folder a policy file names (``artifact:``), which ``crvlm fit --policy`` writes by default."""
    policy = load_policy(policy_path)
    if policy.artifact is None:
        raise PolicyError(f"{policy_path}: no `artifact:` folder named; fit with `crvlm fit --policy FILE --out DIR` "
                          "and serve/evaluate with --artifact DIR")
    if not (policy.artifact / "fit.json").exists():
        raise PolicyError(f"{policy_path}: its artifact {policy.artifact} is not fitted yet: run "
                          f"`crvlm fit --policy {policy_path}`")
    return policy.artifact


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------


def policy_metrics(policy: Policy, rows: Sequence[Mapping], membership: Mapping[str, set[str]]) -> dict:
    """R / ORR / MB jointly and per constraint from judged rows (``id``, ``scope``, ``refused``).

    Joint: R over the samples the policy refuses, ORR over those it answers. A refusing constraint: R over its own
    samples, ORR over every answered sample. An allowing constraint: ORR over its own samples, R over every refused
    sample — the same sets as a single-constraint model of that constraint is scored on.
    """
    refused_out = [bool(r["refused"]) for r in rows if r["scope"] == "out"]
    refused_in = [bool(r["refused"]) for r in rows if r["scope"] == "in"]

    def block(r_flags, orr_flags) -> dict:
        r, orr = rate(r_flags), rate(orr_flags)
        return {"refusal_rate_out": r, "over_refusal_in": orr,
                "mb_score": mb_score(r, orr) if r_flags and orr_flags else float("nan"),
                "n_out": len(r_flags), "n_in": len(orr_flags)}

    per = {}
    for c in policy.constraints:
        own = [bool(r["refused"]) for r in rows if c.name in membership[r["id"]]]
        per[c.name] = {"action": c.action, "priority": c.priority, "refusal_rate": rate(own), "n": len(own),
                       **(block(own, refused_in) if c.refuses else block(refused_out, own))}
    return {"joint": block(refused_out, refused_in), "constraints": per}


def evaluate_policy(handle: ModelHandle, policy: Policy, data: PolicyData, interventions: Sequence = (),
                    max_new_tokens: int = 16, batch_size: int = 8, judge: str = "keyword",
                    cache_dir: str | Path | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate for the policy's test samples with ``interventions``, judge refusals and score them
    (:func:`policy_metrics`); also tokens/s and the judge. Returns ``(metrics, rows)``."""
    from crvlm_core.methods.refusal_vectors import evaluate

    result = evaluate(handle, data.test, list(interventions), max_new_tokens=max_new_tokens, batch_size=batch_size,
                      judge=judge, progress=progress, cache_dir=cache_dir)
    rows = [{**r, "constraints": sorted(data.membership[r["id"]])} for r in result.rows]
    metrics = policy_metrics(policy, rows, data.membership)
    metrics.update({k: result.metrics[k] for k in ("tokens_per_second", "generation_seconds", "judge", "model",
                                                   "max_new_tokens")})
    return metrics, rows


# ------------------------------------------------------------------------------------------------------------------
# Command line (called from cli.py: `crvlm fit --policy`, `crvlm eval --policy | --artifact <policy folder>`)
# ------------------------------------------------------------------------------------------------------------------


def cmd_fit_policy(args) -> int:
    from crvlm_core.models.loading import load_model

    policy = load_policy(args.policy)
    handle = load_model(args.model)
    steering, fit = fit_policy(handle, policy, args.out, design=args.design)
    print(f"[fit] policy {policy.name!r} ({fit['design']}) on {handle.spec}: {len(policy.constraints)} constraints, "
          f"{fit['fit_seconds']:.1f} s → {args.out}")
    return 0


def cmd_eval_policy(args) -> int:
    from crvlm_core.cli.main import FIT_JSON, _write_outputs
    from crvlm_core.models.loading import load_model

    artifact = Path(args.artifact) if args.artifact else None
    if artifact is None and args.policy:
        policy = load_policy(args.policy)
        artifact = policy.artifact if policy.artifact and (policy.artifact / FIT_JSON).exists() else None
    fit = json.loads((artifact / FIT_JSON).read_text()) if artifact else {}
    if artifact is not None:
        policy = parse_policy(yaml.safe_load((artifact / POLICY_YAML).read_text()), where=str(artifact / POLICY_YAML))
    elif not args.model:
        raise PolicyError(f"{args.policy}: not fitted (no artifact); give --artifact DIR, or --model SPEC to score "
                          "the unsteered model on the policy's test data")
    opts = {**policy.fit_options(), **fit.get("options", {})}
    handle = load_model(args.model or fit["model"])
    steering = load_policy_steering(artifact, handle) if artifact else None
    data = policy_data(policy, opts["n_train"], opts["n_test"], opts["seed"])
    metrics, rows = evaluate_policy(handle, policy, data, [steering] if steering else [],
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge=args.judge)
    metrics.update({"artifact": str(artifact) if artifact else None, "method": "policy" if artifact else "unsteered",
                    "design": fit.get("design"), "policy": policy.name})
    _write_outputs(Path(args.out), metrics, rows)
    j = metrics["joint"]
    print(f"[eval] policy {policy.name!r} on {handle.spec}: joint R={j['refusal_rate_out']:.3f} "
          f"ORR={j['over_refusal_in']:.3f} MB={j['mb_score']:.3f}; " + ", ".join(
              f"{n} MB={m['mb_score']:.3f}" for n, m in metrics["constraints"].items()) + f" → {args.out}")
    return 0
