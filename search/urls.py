"""Storage and tracking URLs, which may hold a password: taken from the environment with
``${VAR}``, so experiment files hold none, and masked wherever one is printed or logged."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
POSTGRES_HINT = "install the PostgreSQL driver with `pip install soupsearch[postgres]`"


def expand(value: str) -> str:
    """``value`` with each ``${VAR}`` replaced by that environment variable; ValueError naming an unset one."""

    def lookup(match: re.Match) -> str:
        if match[1] not in os.environ:
            raise ValueError(f"environment variable {match[1]} is not set")
        return os.environ[match[1]]

    return _VARIABLE.sub(lookup, value)


def masked(url: str, text: str | None = None) -> str:
    """``text`` (by default ``url`` itself) with ``url``'s password, as written or decoded, shown as ***."""
    text = url if text is None else text
    try:
        password = urlsplit(url).password
    except ValueError:  # not a URL (an unbalanced bracket in a path): it holds no password either
        return text
    for form in filter(None, {password, unquote(password or "")}):
        text = text.replace(form, "***")
    return text


def driver_hint(problem: BaseException | None) -> str:
    """What to install when a database driver is missing (Optuna re-raises that as its own ImportError);
    empty for any other failure."""
    while problem is not None:
        if isinstance(problem, ModuleNotFoundError) and (problem.name or "").startswith("psycopg"):
            return f" ({POSTGRES_HINT})"
        problem = problem.__cause__ or problem.__context__
    return ""
