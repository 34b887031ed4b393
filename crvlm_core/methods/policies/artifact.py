"""A fitted policy's artifact folder: ``artifact.json`` (kind ``policy``) + ``fit.json`` + ``policy.yaml`` + one
sub-folder per constraint (a refusing constraint's CR-VLM calibrator, an allowing constraint's gate head) or, for
the ``union`` design, one calibrator in ``union/``; written whole, verified and read back as an intervention."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
import yaml

from crvlm_core.core.artifacts import (ARTIFACT_JSON, FIT_JSON, check_model, read_manifest, write_artifact)
from crvlm_core.core.io import atomic_save_safetensors, atomic_write_bytes
from crvlm_core.methods.crvlm.calibrated import CalibratedSteering
from crvlm_core.methods.policies.spec import Policy, PolicyError, load_policy, parse_policy
from crvlm_core.methods.policies.steering import PolicySteering
from crvlm_core.models.handle import ModelHandle

__all__ = ["KIND", "POLICY_YAML", "fitted_artifact", "load_policy_steering", "read_policy", "save_policy"]

KIND = "policy"
POLICY_YAML = "policy.yaml"
UNION_DIR = "union"
CONSTRAINTS_DIR = "constraints"
HEAD_FILE = "head.safetensors"


def _head(tensors: Mapping[str, torch.Tensor]) -> torch.nn.Linear:
    head = torch.nn.Linear(tensors["weight"].shape[1], 1)
    head.load_state_dict(dict(tensors))
    return head.requires_grad_(False)


def save_policy(folder: str | Path, policy: Policy, steering, fit: dict, *, model: dict, inputs: dict,
                force: bool = False) -> Path:
    """Write a fitted policy's artifact folder whole: ``steering`` is a :class:`PolicySteering` (``composed``) or a
    ``CalibratedSteering`` (``union``); ``fit`` the summary written as ``fit.json``.

    Raises:
        ArtifactExists: ``folder`` holds something and ``force`` is false.
    """
    def write_files(tmp: Path) -> None:
        atomic_write_bytes(tmp / POLICY_YAML, yaml.safe_dump(policy.to_dict(), sort_keys=False).encode())
        if not isinstance(steering, PolicySteering):
            steering.write_files(tmp / UNION_DIR)
            return
        for name, s in steering.steerings.items():
            s.write_files(tmp / CONSTRAINTS_DIR / name)
        for name, head in steering.heads.items():
            atomic_save_safetensors(tmp / CONSTRAINTS_DIR / name / HEAD_FILE,
                                    {"weight": head.weight.detach(), "bias": head.bias.detach()})

    config = {"method": "policy", "design": fit["design"], "policy": policy.to_dict(), "options": fit["options"],
              "layers": list(steering.layers), "gate_layer": steering.gate_layer}
    return write_artifact(folder, KIND, write_files, config=config, model=model, inputs=inputs, force=force,
                          extra_json={FIT_JSON: fit})


def read_policy(folder: str | Path) -> tuple[Policy, dict, dict]:
    """``(policy, fit.json, artifact.json)`` of a verified policy artifact folder.

    Raises:
        ArtifactError: not a policy artifact, or damaged.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, kinds=(KIND,))
    policy = parse_policy(yaml.safe_load((folder / POLICY_YAML).read_text(encoding="utf-8")),
                          where=str(folder / POLICY_YAML))
    fit = json.loads((folder / FIT_JSON).read_text(encoding="utf-8")) if (folder / FIT_JSON).is_file() else {}
    return policy, fit, manifest


def load_policy_steering(folder: str | Path, handle: ModelHandle | None = None):
    """The intervention a policy artifact folder (``crvlm fit --policy``) describes, checked against ``handle``
    when given: a :class:`PolicySteering` (``composed``) or a ``CalibratedSteering`` (``union``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    policy, _, manifest = read_policy(folder)
    if handle is not None:
        check_model(manifest, handle, folder)
    config = manifest["config"]
    if config["design"] == "union":
        steering = CalibratedSteering.read_files(folder / UNION_DIR)
    else:
        cals = {c.name: CalibratedSteering.read_files(folder / CONSTRAINTS_DIR / c.name) for c in policy.refusing}
        heads = {c.name: _head(load_file(str(folder / CONSTRAINTS_DIR / c.name / HEAD_FILE)))
                 for c in policy.allowing}
        steering = PolicySteering(policy, cals, heads, config["gate_layer"])
    if handle is not None:
        steering.validate(handle)
    return steering


def fitted_artifact(policy_path: str | Path) -> Path:
    """The artifact folder a policy file names (``artifact:``), which ``crvlm fit --policy`` writes by default."""
    policy = load_policy(policy_path)
    if policy.artifact is None:
        raise PolicyError(f"{policy_path}: no `artifact:` folder named; fit with `crvlm fit --policy FILE --out DIR` "
                          "and serve/evaluate with --artifact DIR")
    if not (policy.artifact / ARTIFACT_JSON).exists():
        raise PolicyError(f"{policy_path}: its artifact {policy.artifact} is not fitted yet: run "
                          f"`crvlm fit --policy {policy_path}`")
    return policy.artifact
