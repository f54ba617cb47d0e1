"""``soupsearch zoo build|verify|publish|report``. A user error raises UserError (exit 2); a local
zoo that differs from the published one exits 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from user_input import UserError


def _zoo_build(args: argparse.Namespace) -> int:
    from zoo.build import build_zoo, open_zoo
    from zoo.recipe import recipe_for

    progress = args.verbosity > 0  # --quiet: the folder alone
    if args.train:
        folder = build_zoo(recipe_for(args.variant, args.seed), progress=progress)
    else:
        folder = open_zoo(args.variant, seed=args.seed, progress=progress)
    print(f"zoo {args.variant}: {folder}")
    return 0


def _zoo_verify(args: argparse.Namespace) -> int:
    from zoo.build import LOCK, ZooError, differences, verify, weights_digest, zoo_dir
    from zoo.recipe import recipe_for

    recipe = recipe_for(args.variant, args.seed)
    folder = zoo_dir(recipe)
    try:
        manifest = verify(folder)
        different = differences(recipe, manifest)
    except ZooError as problem:
        raise UserError(f"{problem}; run `soupsearch zoo build --variant {args.variant}`") from None
    if different:
        print(
            f"zoo {args.variant}: {folder} ({manifest.get('source', 'trained')}) differs from the published zoo "
            f"in {len(different)} of {len(manifest['files'])} files: {', '.join(different[:6])}"
            f"{' ...' if len(different) > 6 else ''}",
            file=sys.stderr,
        )
        return 1
    print(
        f"zoo {args.variant}: {len(manifest['files'])} files in {folder} equal the published zoo "
        f"(weights {weights_digest(manifest['files'])}, {LOCK.name})"
    )
    return 0


def _zoo_publish(args: argparse.Namespace) -> int:
    from zoo.build import ZooError, publish
    from zoo.recipe import recipe_for

    try:
        target = publish(recipe_for(args.variant, 0))
    except ZooError as problem:
        raise UserError(f"{problem}; run `soupsearch zoo build --variant {args.variant} --train` first") from None
    print(f"published zoo {args.variant} into {target}")
    return 0


def _zoo_report(args: argparse.Namespace) -> int:
    from zoo.report import write_report

    if Path(args.out).is_dir():  # found before minutes of scoring, not after
        raise UserError(f"--out {args.out}: a folder; give the report's file name")
    path = write_report(args.variant, Path(args.out), progress=args.verbosity > 0, seed=args.seed)
    print(f"wrote {path}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """`soupsearch zoo ACTION`: the zoo's commands, mounted on the soupsearch command line."""
    zoo = commands.add_parser("zoo", help="get, verify, report on or publish the tiny model zoo")
    actions = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    def variant(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--variant",
            choices=["tiny", "pico"],
            default="tiny",
            help="tiny (experiments, docs) or pico (unit tests); default tiny",
        )
        parser.add_argument(
            "--seed",
            type=int,
            help="the recipe's training seed (default $SOUPSEARCH_ZOO_SEED, else 0; only seed 0 is published)",
        )

    build = actions.add_parser("build", help="unpack the published zoo (or train it when the recipe has none)")
    variant(build)
    build.add_argument(
        "--train",
        "--force",
        action="store_true",
        help="train from the recipe even if published weights or a verified cache exist",
    )
    build.set_defaults(func=_zoo_build)

    check = actions.add_parser(
        "verify", help="check the cached zoo's checksums, and whether it equals the published one"
    )
    variant(check)
    check.set_defaults(func=_zoo_verify)

    release = actions.add_parser(
        "publish",
        help="copy the cached zoo (seed 0) into the repository's published "
        "weights and lock file (maintainers, after a recipe change)",
    )
    release.add_argument("--variant", choices=["tiny", "pico"], default="tiny", help="default tiny")
    release.set_defaults(func=_zoo_publish)

    report = actions.add_parser("report", help="score every zoo model on every task; write docs/zoo.md")
    variant(report)
    report.add_argument("--out", default="docs/zoo.md", help="where to write the table (default docs/zoo.md)")
    report.set_defaults(func=_zoo_report)
