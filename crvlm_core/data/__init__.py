"""Stage 1, data: the sample schema, JSONL loading with line-numbered errors, images, scopes, seeded splits and the bundled datasets.
Re-exports for users (``from crvlm_core.data import load_dataset``); library modules import from the defining module."""

from crvlm_core.data.bundled import list_datasets, load_dataset
from crvlm_core.data.limits import PromptTooLong, check_prompt_lengths, context_length
from crvlm_core.data.schema import DataError, EmptyDataFile, Sample, fingerprint, read_jsonl
from crvlm_core.data.splits import assign_scope, scope_dataset, split, take_per_scope

__all__ = ["DataError", "EmptyDataFile", "PromptTooLong", "Sample", "assign_scope", "check_prompt_lengths",
           "context_length", "fingerprint", "list_datasets", "load_dataset", "read_jsonl", "scope_dataset", "split",
           "take_per_scope"]
