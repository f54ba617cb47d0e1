"""The errors merge_core raises for bad input: the UserError family, which callers map to exit code 2."""

from __future__ import annotations

from user_input import UserError


class MergeInputError(UserError):
    """A config or parent that mergekit would reject (or that would corrupt a merge).

    The message names the offending model, tensor, parameter or key, and the error is raised
    before any tensor arithmetic runs.
    """


class ParentError(MergeInputError):
    """A parent that no config can merge (non-finite weights): fatal to a whole study, not one trial."""
