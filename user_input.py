"""What users hand us: the one error family for bad input, and YAML read strictly.

``search``, ``merge_core``, ``evals`` and ``zoo`` raise ``UserError`` or a subclass of their own;
``soupsearch`` maps the whole family to exit code 2 in one place. This module sits beside the
packages, so that none of them imports another package for it.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from pydantic import ValidationError


class UserError(Exception):
    """A mistake in what the user gave; the one-line message names the file, key, model, task or tensor."""


def env_int(name: str, default: int, meaning: str, minimum: int | None = None) -> int:
    """The whole number in environment variable ``name``, ``default`` when it is unset or blank;
    UserError naming the variable and its value otherwise."""
    said = os.environ.get(name, "").strip()
    if not said:
        return default
    if not (said.isascii() and said.removeprefix("-").isdigit()) or (minimum is not None and int(said) < minimum):
        at_least = "" if minimum is None else f" >= {minimum}"
        raise UserError(f"{name}={said!r}: expected a whole number{at_least} ({meaning})")
    return int(said)


def one_line(problem: ValidationError, located: bool = True) -> str:
    """pydantic's errors as ``loc: message (got value); ...``, without its multi-line layout and
    links; the value only where it is a scalar, the location only where ``located``."""

    def said(error) -> str:
        where = f"{'.'.join(map(str, error['loc'])) or '(top)'}: " if located else ""
        value = error.get("input")
        scalar = value is None or isinstance(value, (str, int, float))
        got = f" (got {value!r})" if scalar and error["type"] != "missing" else ""
        return f"{where}{error['msg']}{got}"

    return "; ".join(said(e) for e in problem.errors())


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` then an override is intended
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeConstructor refuses it below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> object:
    """``text`` read with yaml's safe loader, refusing duplicate keys; UserError naming ``where``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        what = getattr(problem, "problem", None) or " ".join(str(problem).split())  # a ReaderError has neither
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"{where}: not valid YAML: {what}{at}") from None


def read_file(path: Path, what: str) -> str:
    """The UTF-8 text of the ``what`` (say "experiment file") at ``path``; UserError naming the path
    when it is missing, a folder, binary or unreadable."""
    if path.is_dir():
        raise UserError(f"{path}: a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not path.exists():
        raise UserError(f"{path}: no such {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as problem:
        raise UserError(f"{path}: not UTF-8 text (byte {problem.start}); is it a binary file?") from None
    except OSError as problem:
        raise UserError(f"{path}: cannot be read ({problem.strerror})") from None
