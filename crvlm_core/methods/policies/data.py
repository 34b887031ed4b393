"""A policy's data: seeded train/test samples of every constraint, each labelled by the composition rule over every
constraint whose data holds it (``scope`` = ``out``: the policy refuses it), with each sample's constraints."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

from crvlm_core.data.schema import Sample
from crvlm_core.data.splits import split
from crvlm_core.methods.policies.spec import Policy, PolicyError, decide

__all__ = ["PolicyData", "policy_data"]


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
