"""Where the data stage's names used to live: re-exports of :mod:`crvlm_core.data.schema`,
:mod:`crvlm_core.data.bundled` and :mod:`crvlm_core.data.splits` until every importer names the defining module."""

from crvlm_core.data.bundled import COMBINED, DATASETS_DIR, list_datasets, load_dataset  # re-export; integration rewrites importers
from crvlm_core.data.schema import DataError, Sample, fingerprint, read_jsonl  # re-export; integration rewrites importers
from crvlm_core.data.splits import assign_scope, scope_dataset, split, take_per_scope  # re-export; integration rewrites importers

__all__ = [
    "COMBINED", "DATASETS_DIR", "DataError", "Sample", "assign_scope", "fingerprint", "list_datasets", "load_dataset",
    "read_jsonl", "scope_dataset", "split", "take_per_scope",
]
