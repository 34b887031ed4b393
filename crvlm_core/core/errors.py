"""The one error type for bad input: a missing or damaged file, an option out of range, a mismatched artifact.
Its message is one line naming the file, option or field and what to do; the CLI prints it and exits 2."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input a user can fix (subclasses :class:`ValueError`, so older ``except ValueError`` still catches it)."""
