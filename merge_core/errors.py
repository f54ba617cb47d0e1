"""The one error merge_core raises for bad input; callers map it to their own exit codes."""

from __future__ import annotations


class MergeInputError(ValueError):
    """A config or parent that mergekit would reject (or that would corrupt a merge).

    The message names the offending model, tensor, parameter or key, and the error is raised
    before any tensor arithmetic runs.
    """
