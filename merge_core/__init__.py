"""Build mergekit merges in memory, exactly as mergekit-yaml would, into one reused candidate."""

from merge_core.engine import BuildReport, Candidate, Engine
from merge_core.errors import MergeInputError
from merge_core.export import merge_to_folder
from merge_core.parents import Parents
from merge_core.planner import MergePlan, plan_merge

__all__ = ["BuildReport", "Candidate", "Engine", "MergeInputError", "MergePlan", "Parents",
           "merge_to_folder", "plan_merge"]
