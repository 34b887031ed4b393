"""Composable refusal policies: YAML constraints fitted with CR-VLM calibrators and composed by priority.
Re-exports for users (``from crvlm_core.methods.policies import fit_policy``); library modules import from the
defining module."""

from crvlm_core.methods.policies.artifact import fitted_artifact, load_policy_steering
from crvlm_core.methods.policies.data import PolicyData, policy_data
from crvlm_core.methods.policies.evaluate import evaluate_policy, policy_metrics
from crvlm_core.methods.policies.fit import fit_policy
from crvlm_core.methods.policies.spec import Policy, PolicyError, compose_gates, decide, load_policy, parse_policy
from crvlm_core.methods.policies.steering import PolicySteering

__all__ = ["Policy", "PolicyData", "PolicyError", "PolicySteering", "compose_gates", "decide", "evaluate_policy",
           "fit_policy", "fitted_artifact", "load_policy", "load_policy_steering", "parse_policy", "policy_data",
           "policy_metrics"]
