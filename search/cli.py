"""The ``soupsearch`` command line. Exit codes: 0 ok, 2 bad input, 1 any other failure."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A user error; the message names the offending file, key, model or tensor."""


def _not_built(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        print(f"soupsearch {name}: not built yet (see the project's open issues)", file=sys.stderr)
        return EXIT_FAILURE

    return command


def _zoo_build(args: argparse.Namespace) -> int:
    from search.zoo.build import build_zoo, open_zoo
    from search.zoo.recipe import RECIPES

    folder = build_zoo(RECIPES[args.variant]) if args.force else open_zoo(args.variant)
    print(f"zoo {args.variant}: {folder}")
    return EXIT_OK


def _zoo_verify(args: argparse.Namespace) -> int:
    from search.zoo.build import ZooError, verify, zoo_dir
    from search.zoo.recipe import RECIPES

    folder = zoo_dir(RECIPES[args.variant])
    try:
        manifest = verify(folder)
    except ZooError as problem:
        raise BadInput(f"{problem}; run `soupsearch zoo build --variant {args.variant}`") from None
    print(f"zoo {args.variant}: {len(manifest['files'])} files intact in {folder}")
    return EXIT_OK


def _zoo_report(args: argparse.Namespace) -> int:
    from search.zoo.report import write_report

    path = write_report(args.variant, Path(args.out), progress=not args.quiet)
    print(f"wrote {path}")
    return EXIT_OK


def _add_zoo(commands: argparse._SubParsersAction) -> None:
    zoo = commands.add_parser("zoo", help="build, verify or report on the tiny model zoo")
    actions = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    def variant(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--variant", choices=["tiny", "pico"], default="tiny",
                            help="tiny (experiments, docs) or pico (unit tests); default tiny")

    build = actions.add_parser("build", help="build the zoo, or verify and reuse a cached one")
    variant(build)
    build.add_argument("--force", action="store_true", help="rebuild even if a verified cache exists")
    build.set_defaults(func=_zoo_build)

    check = actions.add_parser("verify", help="check the cached zoo against its manifest checksums")
    variant(check)
    check.set_defaults(func=_zoo_verify)

    report = actions.add_parser("report", help="score every zoo model on every task; write docs/zoo.md")
    variant(report)
    report.add_argument("--out", default="docs/zoo.md", help="where to write the table (default docs/zoo.md)")
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    report.set_defaults(func=_zoo_report)


PLANNED = {
    "run": "run or resume the study that FILE describes",
    "worker": "join an existing study from another process or machine",
    "validate": "check an experiment without running it; print the search space",
    "merge": "build a mergekit config with soupsearch's engine (drop-in for mergekit-yaml)",
    "eval": "score a saved model through the same evaluation path as the search",
    "export": "export the best config YAML, exact weights, model card and test scores",
    "status": "trials done, best so far, what is running",
    "dashboard": "MLflow UI on localhost for this project's store",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="soupsearch",
        description="Search merge configurations of fine-tuned language models, with no training.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in PLANNED.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        sub.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        sub.set_defaults(func=_not_built(name))
    _add_zoo(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BadInput as problem:
        print(f"soupsearch: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("soupsearch: interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
