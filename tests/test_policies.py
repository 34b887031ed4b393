"""Refusal policies: parsing and validation errors, the composition rule's truth table (hard and soft), and a real
fit/eval/save/load round trip of both designs on the tiny random LLaVA."""

import itertools
import json

import pytest
import torch
import yaml

from crvlm_core.cli.main import main
from crvlm_core.core.artifacts import ArtifactExists
from crvlm_core.methods.loading import load_interventions
from crvlm_core.methods.policies.artifact import fitted_artifact, load_policy_steering
from crvlm_core.methods.policies.data import policy_data
from crvlm_core.methods.policies.evaluate import evaluate_policy
from crvlm_core.methods.policies.fit import fit_policy
from crvlm_core.methods.policies.spec import PolicyError, compose_gates, decide, load_policy, parse_policy
from crvlm_core.methods.policies.steering import PolicySteering
from crvlm_core.models.loading import load_model
from crvlm_core.steer.score import steered_logits

EXAMPLE = {
    "name": "bio_physics_harmful",
    "constraints": [
        {"name": "harmful", "data": {"dataset": "harmful"}, "action": "refuse", "priority": 3},
        {"name": "biology", "data": {"dataset": "mmlu", "subjects": ["biology"]}, "action": "allow", "priority": 2},
        {"name": "physics", "data": {"dataset": "mmlu", "subjects": ["physics"]}, "action": "refuse", "priority": 1},
    ],
}
TINY_FIT = {"n_train": 3, "n_test": 2, "epochs": 2, "width": 16, "behavioural_epochs": 1, "layers": [0]}


def with_constraint(k, **change):
    raw = json.loads(json.dumps(EXAMPLE))
    raw["constraints"][k].update(change)
    return raw


def test_example_file_parses():
    policy = load_policy("examples/policy_bio_physics_harmful.yaml")
    assert [c.name for c in policy.refusing] == ["harmful", "physics"]
    assert [c.name for c in policy.allowing] == ["biology"]
    assert policy.artifact is not None and policy.fit_options()["design"] == "composed"


@pytest.mark.parametrize("raw,match", [
    (with_constraint(0, data={"dataset": "nope"}), "unknown dataset 'nope'"),
    (with_constraint(1, data={"dataset": "mmlu", "subjects": ["astrology"]}), "unknown subject"),
    (with_constraint(2, action="ignore"), "action must be one of"),
    (with_constraint(2, priority="high"), "priority must be an integer"),
    (with_constraint(2, name="biology"), "duplicate name"),
    (with_constraint(2, data=None), "`data` must be"),
    (with_constraint(2, colour="red"), "unknown key"),
    ({**EXAMPLE, "constraints": []}, "non-empty list"),
    ({**EXAMPLE, "constraints": [EXAMPLE["constraints"][1]]}, "no constraint refuses"),
    ({**EXAMPLE, "default": "refuse"}, "default must be `allow`"),
    ({**EXAMPLE, "fit": {"design": "magic"}}, "fit.design"),
    ({**EXAMPLE, "fit": {"epochz": 3}}, "unknown fit option"),
    ({**EXAMPLE, "fit": {"epochs": "many"}}, "fit.epochs must be an integer"),
    ({**EXAMPLE, "fit": {"lr": 0}}, "fit.lr must be a positive number"),
    ({**EXAMPLE, "fit": {"layers": []}}, "fit.layers must be a non-empty list"),
    ([1, 2], "a policy is a mapping"),
])
def test_validation_errors_name_the_problem(raw, match):
    with pytest.raises(PolicyError, match=match):
        parse_policy(raw)


def test_empty_and_missing_jsonl_constraints(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PolicyError, match="empty constraint"):
        parse_policy(with_constraint(2, data={"jsonl": "empty.jsonl"}), base_dir=tmp_path)
    with pytest.raises(PolicyError, match="no such JSONL"):
        parse_policy(with_constraint(2, data={"jsonl": "gone.jsonl"}), base_dir=tmp_path)
    (tmp_path / "p.yaml").write_text("constraints: [oops")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(tmp_path / "p.yaml")


def test_composition_rule_truth_table():
    policy = parse_policy(EXAMPLE)
    names = ["harmful", "biology", "physics"]
    # refuse iff a refusing constraint fired that no higher-priority allowing constraint overrides
    expected = {(): False, ("harmful",): True, ("biology",): False, ("physics",): True,
                ("harmful", "biology"): True,   # harmful (3) outranks biology (2)
                ("biology", "physics"): False,  # biology (2) outranks physics (1)
                ("harmful", "physics"): True, ("harmful", "biology", "physics"): True}
    for k in range(4):
        for fired in itertools.combinations(names, k):
            assert decide(policy, fired) is expected[fired], fired
            rho = {n: torch.tensor([1.0 if n in fired else 0.0]) for n in names}
            soft = compose_gates(policy, rho)
            assert bool(max(float(v) for v in soft.values()) > 0.5) is expected[fired], fired
    with pytest.raises(KeyError):
        decide(policy, ["chemistry"])
    tie = parse_policy(with_constraint(1, priority=1))  # equal priority: the allowing constraint does not override
    assert decide(tie, ["biology", "physics"]) is True


def test_policy_data_labels_and_splits():
    policy = parse_policy(EXAMPLE)
    data = policy_data(policy, n_train=4, n_test=3, seed=1)
    assert len(data.train) == 12 and len(data.test) == 9
    assert not {s.id for s in data.train} & {s.id for s in data.test}
    for s in data.train + data.test:
        assert s.scope == ("in" if data.membership[s.id] == {"biology"} else "out")
    assert policy_data(policy, 4, 3, seed=1).test == data.test  # seeded
    with pytest.raises(PolicyError, match="fewer than"):
        policy_data(policy, n_train=400, n_test=200)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


@pytest.mark.parametrize("design", ["composed", "union"])
def test_fit_eval_round_trip_on_a_tiny_model(tiny, tmp_path, design):
    policy = parse_policy({**EXAMPLE, "fit": {**TINY_FIT, "design": design}})
    steering, fit = fit_policy(tiny, policy, tmp_path, progress=False)
    assert fit["method"] == "policy" and fit["design"] == design and fit["fit_seconds"] > 0
    loaded = load_policy_steering(tmp_path, tiny)
    enc = tiny.build_inputs(["What is a cell?", "How do I build a bomb?"])
    assert (steered_logits(tiny, enc, [loaded]) - steered_logits(tiny, enc, [steering])).abs().max() < 1e-5
    if design == "composed":
        assert isinstance(loaded, PolicySteering) and set(loaded.steerings) == {"harmful", "physics"}
        steered_logits(tiny, enc, [loaded])
        g = loaded.last_gates
        assert torch.allclose(g["composed:physics"], g["raw:physics"] * (1 - g["raw:biology"]))
        assert torch.allclose(g["composed:harmful"], g["raw:harmful"])  # nothing outranks harmful
    manifest = json.loads((tmp_path / "artifact.json").read_text())
    assert manifest["kind"] == "policy" and manifest["config"]["design"] == design
    parts = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")}
    if design == "composed":  # one sub-folder per constraint: the refusing ones' calibrators, the allowing one's head
        assert {p.split("/")[1] for p in parts} == {"harmful", "biology", "physics"}
        assert "constraints/biology/head.safetensors" in parts
    else:
        assert parts and all(p.startswith("union/") for p in parts)
    again, fit2 = fit_policy(tiny, policy, tmp_path, progress=False)  # unchanged inputs: reused, not refitted
    assert fit2["created"] == fit["created"] and fit2["key"] == fit["key"]
    with pytest.raises(ArtifactExists):  # other options into the fitted folder: stops, the folder is kept
        fit_policy(tiny, policy, tmp_path, progress=False, seed=7)
    assert json.loads((tmp_path / "fit.json").read_text()) == fit
    data = policy_data(policy, 3, 2)
    metrics, rows = evaluate_policy(tiny, policy, data, [loaded], max_new_tokens=2, progress=False)
    assert set(metrics["constraints"]) == {"harmful", "biology", "physics"} and len(rows) == 6
    assert metrics["joint"]["n_out"] == 4 and metrics["joint"]["n_in"] == 2
    for name, m in metrics["constraints"].items():
        assert m["n"] == 2 and 0 <= m["refusal_rate"] <= 1


def test_cli_fit_and_eval_policy(tmp_path):
    raw = {**EXAMPLE, "fit": {**TINY_FIT, "behavioural_epochs": 0}, "artifact": "art"}
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model", "tiny-llava", "--policy", str(tmp_path / "policy.yaml"), "--out", str(tmp_path / "art")])
    assert exc.value.code == 0
    before = {p: p.read_bytes() for p in (tmp_path / "art").rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:  # a second fit into the folder stops with exit 2 and leaves it as it was
        main(["fit", "--model", "tiny-llava", "--policy", str(tmp_path / "policy.yaml"), "--out", str(tmp_path / "art")])
    assert exc.value.code == 2
    assert {p: p.read_bytes() for p in (tmp_path / "art").rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--policy", str(tmp_path / "policy.yaml"), "--max-new-tokens", "2", "--judge", "learned", "--out",
              str(tmp_path / "ev")])
    assert exc.value.code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["method"] == "policy" and metrics["design"] == "composed"
    assert set(metrics["constraints"]) == {"harmful", "biology", "physics"}
    with pytest.raises(SystemExit) as exc:  # the artifact folder alone works too
        main(["eval", "--artifact", str(tmp_path / "art"), "--max-new-tokens", "2", "--judge", "learned", "--out",
              str(tmp_path / "ev2")])
    assert exc.value.code == 0
    # what `crvlm serve --policy FILE` serves: the file's artifact, loaded like any `crvlm fit` folder
    assert fitted_artifact(tmp_path / "policy.yaml") == tmp_path / "art"
    (iv,) = load_interventions(tmp_path / "art", load_model("tiny-llava"))
    assert isinstance(iv, PolicySteering)
    (tmp_path / "unfitted.yaml").write_text(yaml.safe_dump({**EXAMPLE, "artifact": "nothing"}))
    with pytest.raises(PolicyError, match="not fitted yet"):
        fitted_artifact(tmp_path / "unfitted.yaml")
    (tmp_path / "nowhere.yaml").write_text(yaml.safe_dump(EXAMPLE))
    with pytest.raises(PolicyError, match="no `artifact:` folder"):
        fitted_artifact(tmp_path / "nowhere.yaml")
