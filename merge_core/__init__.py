"""Build mergekit merges in memory, exactly as mergekit-yaml would, into one reused candidate.

The names below are imported on first use: ``merge_core.methods.registry`` is read by code that
loads no torch.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import TYPE_CHECKING

# numba's OpenMP pool, started by the first parallel kernel, sets the process's OpenMP thread count,
# which torch's CPU ops share: a process limited by OMP_NUM_THREADS starts numba with that limit
# too, or every matmul after a merge would run on numba's count (the CPUs it may use). numba reads
# it once, so only where numba is not imported yet. The mark tells a child process that its
# inherited NUMBA_NUM_THREADS came from its parent's limit, not from the user: it uses its own.
_omp, _mark = os.environ.get("OMP_NUM_THREADS", ""), "SOUPSEARCH_NUMBA_THREADS_FROM_OMP"
if "numba" not in sys.modules:
    if os.environ.get(_mark) is not None and os.environ.get(_mark) == os.environ.get("NUMBA_NUM_THREADS"):
        del os.environ["NUMBA_NUM_THREADS"], os.environ[_mark]
    if _omp.isascii() and _omp.isdigit() and int(_omp) > 0 and "NUMBA_NUM_THREADS" not in os.environ:
        os.environ["NUMBA_NUM_THREADS"] = os.environ[_mark] = _omp

if TYPE_CHECKING:
    from merge_core.engine import BuildReport, Candidate, Engine
    from merge_core.errors import MergeInputError
    from merge_core.export import merge_to_folder
    from merge_core.parents import Parents
    from merge_core.planner import MergePlan, plan_merge

_MODULES = {
    "BuildReport": "engine",
    "Candidate": "engine",
    "Engine": "engine",
    "MergeInputError": "errors",
    "MergePlan": "planner",
    "Parents": "parents",
    "merge_to_folder": "export",
    "plan_merge": "planner",
}
__all__ = [
    "BuildReport",
    "Candidate",
    "Engine",
    "MergeInputError",
    "MergePlan",
    "Parents",
    "merge_to_folder",
    "plan_merge",
]


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'merge_core' has no attribute {name!r}")
    return getattr(import_module(f"merge_core.{_MODULES[name]}"), name)
