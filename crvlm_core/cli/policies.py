"""``crvlm fit --policy FILE`` and ``crvlm eval --policy FILE | --artifact <policy folder>``: the command line's
glue around :mod:`crvlm_core.methods.policies` (fit and save a policy; score it per constraint and jointly)."""

from __future__ import annotations

import argparse
from pathlib import Path

from crvlm_core.cli.inputs import deferred_interrupt
from crvlm_core.core.artifacts import ARTIFACT_JSON
from crvlm_core.core.io import write_run_outputs
from crvlm_core.data.limits import check_prompt_lengths
from crvlm_core.methods.policies.artifact import load_policy_steering, read_policy
from crvlm_core.methods.policies.data import policy_data
from crvlm_core.methods.policies.evaluate import evaluate_policy
from crvlm_core.methods.policies.fit import fit_policy
from crvlm_core.methods.policies.spec import PolicyError, load_policy
from crvlm_core.cli.placement import load_placed

__all__ = ["cmd_eval_policy", "cmd_fit_policy"]


def cmd_fit_policy(args: argparse.Namespace) -> int:
    """Fit the policy file ``--policy`` on ``--model`` and save it as the artifact folder ``--out`` (a folder that
    holds anything stops the fit unless ``--force``)."""
    policy = load_policy(args.policy)
    handle = load_placed(args, args.model)
    opts = policy.fit_options(design=args.design)
    data = policy_data(policy, opts["n_train"], opts["n_test"], opts["seed"])
    check_prompt_lengths(handle, data.train + data.test, getattr(args, "max_prompt_tokens", None),
                         source=args.policy)
    _, fit = fit_policy(handle, policy, args.out, design=args.design, reuse=False,
                        force=bool(getattr(args, "force", False)))
    print(f"[fit] policy {policy.name!r} ({fit['design']}) on {handle.spec}: {len(policy.constraints)} constraints, "
          f"{fit['fit_seconds']:.1f} s → {args.out}")
    return 0


def _artifact_of(args: argparse.Namespace) -> Path | None:
    """The fitted policy folder: ``--artifact``, else the policy file's ``artifact:`` when it is fitted."""
    if args.artifact:
        return Path(args.artifact)
    policy = load_policy(args.policy)
    return policy.artifact if policy.artifact and (policy.artifact / ARTIFACT_JSON).exists() else None


def cmd_eval_policy(args: argparse.Namespace) -> int:
    """Generate for the policy's test samples (steered by its artifact, or unsteered with ``--model`` when it is not
    fitted), judge, and write ``metrics.json`` (jointly and per constraint) and ``samples.jsonl`` into ``--out``."""
    artifact = _artifact_of(args)
    fit: dict = {}
    if artifact is not None:
        policy, fit, _ = read_policy(artifact)
    elif not args.model:
        raise PolicyError(f"{args.policy}: not fitted (no artifact); give --artifact DIR, or --model SPEC to score "
                          "the unsteered model on the policy's test data")
    else:
        policy = load_policy(args.policy)
    opts = {**policy.fit_options(), **fit.get("options", {})}
    handle = load_placed(args, args.model or fit["model"])
    steering = load_policy_steering(artifact, handle) if artifact else None
    data = policy_data(policy, opts["n_train"], opts["n_test"], opts["seed"])
    check_prompt_lengths(handle, data.test, getattr(args, "max_prompt_tokens", None),
                         source=args.policy)
    metrics, rows = evaluate_policy(handle, policy, data, [steering] if steering else [],
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, judge=args.judge)
    metrics.update({"artifact": str(artifact) if artifact else None, "method": "policy" if artifact else "unsteered",
                    "design": fit.get("design"), "policy": policy.name})
    with deferred_interrupt():
        write_run_outputs(Path(args.out), metrics, rows)
    j = metrics["joint"]
    print(f"[eval] policy {policy.name!r} on {handle.spec}: joint R={j['refusal_rate_out']:.3f} "
          f"ORR={j['over_refusal_in']:.3f} MB={j['mb_score']:.3f}; " + ", ".join(
              f"{n} MB={m['mb_score']:.3f}" for n, m in metrics["constraints"].items()) + f" → {args.out}")
    return 0
