"""Old import path of the policies (split into spec, data, steering, fit, artifact, evaluate); the names below are
re-exported until the integration rewrites their importers."""

from crvlm_core.methods.policies.artifact import fitted_artifact, load_policy_steering  # re-export; integration rewrites importers
from crvlm_core.methods.policies.data import PolicyData, policy_data  # re-export; integration rewrites importers
from crvlm_core.methods.policies.evaluate import evaluate_policy, policy_metrics  # re-export; integration rewrites importers
from crvlm_core.methods.policies.fit import fit_policy  # re-export; integration rewrites importers
from crvlm_core.methods.policies.spec import (ACTIONS, DESIGNS, Constraint, Policy, PolicyError, compose_gates, decide,  # re-export; integration rewrites importers
                                              load_policy, parse_policy)
from crvlm_core.methods.policies.steering import PolicySteering  # re-export; integration rewrites importers
