"""Merge methods: the registry of declarations, and one module per family of fast paths
(linear, slerp, task_arithmetic) with what they share in ``common``."""

from merge_core.methods.registry import METHODS, TASK_VECTOR_METHODS, Cached, Method, Usage, footprint, get

__all__ = ["METHODS", "TASK_VECTOR_METHODS", "Cached", "Method", "Usage", "footprint", "get"]
