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


def _eval_specs(args: argparse.Namespace) -> list:
    """One TaskSpec per --tasks name; --data, --num-fewshot, --gen-kwargs, ... apply as in lm_eval."""
    from lm_eval.utils import simple_parse_args_string
    from pydantic import ValidationError

    from evals.spec import TaskSpec

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data: dict[str, dict[str, str]] = {}
    for item in args.data:
        task, _, rest = item.partition(":")
        split, _, path = rest.partition("=")
        if not (task and split and path):
            raise BadInput(f"--data {item!r}: expected TASK:SPLIT=FILE, e.g. gsm8k:test=test.parquet")
        if task not in names:
            raise BadInput(f"--data {item!r}: task {task!r} is not in --tasks {args.tasks}")
        data.setdefault(task, {})[split] = path
    options = {"num_fewshot": args.num_fewshot, "chat_template": args.chat_template,
               "system_instruction": args.system_instruction,
               "gen_kwargs": simple_parse_args_string(args.gen_kwargs) if args.gen_kwargs else None}
    try:
        return [TaskSpec(task=name, data_files=data.get(name), **options) for name in names]
    except ValidationError as problem:
        raise BadInput(f"--tasks {args.tasks}: {problem}") from None


def _device(requested: str | None) -> str:
    from search.experiment import ExperimentError, pick_device

    try:
        return pick_device(requested or "auto")
    except ExperimentError as problem:
        raise BadInput(f"--{problem}") from None


def _eval(args: argparse.Namespace) -> int:
    import json
    import logging

    from evals.harness import Evaluator, TaskError, load_model

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    specs = _eval_specs(args)
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise BadInput(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    device = _device(args.device)
    try:
        evaluator = Evaluator(*load_model(model_dir, device), specs)
    except TaskError as problem:
        raise BadInput(str(problem)) from None
    result = evaluator.score(args.split, limit=args.limit)
    print(result.table())
    if args.json:
        record = {"model": str(model_dir.resolve()), **result.record(),
                  "splits": {name: s.record() for name, s in evaluator.splits.items()}}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return EXIT_OK if result.ok else EXIT_FAILURE


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    summary = "score a saved model through the same evaluation path as the search"
    sub = commands.add_parser("eval", help=summary, description=summary)
    sub.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder")
    sub.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (bundled: tiny_*)")
    sub.add_argument("--split", choices=["search", "select", "test"], default="test",
                     help="which item split to score (default test)")
    sub.add_argument("--limit", type=_positive_int, help="score only the split's first N items")
    sub.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    sub.add_argument("--data", action="append", default=[], metavar="TASK:SPLIT=FILE",
                     help="local copy of a task's dataset split (.parquet/.jsonl, the hub's schema); repeatable")
    sub.add_argument("--num-fewshot", type=int, help="few-shot examples for every task (default: each task's own)")
    sub.add_argument("--gen-kwargs", help="generation options for every generative task, e.g. max_gen_toks=256")
    sub.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template")
    sub.add_argument("--system-instruction", help="system instruction prepended to every prompt")
    sub.add_argument("--json", metavar="OUT", help="also write scores, per-item results and splits as JSON")
    sub.set_defaults(func=_eval)


def _merge(args: argparse.Namespace) -> int:
    from merge_core import MergeInputError, merge_to_folder

    device = _device(args.device)
    try:
        report = merge_to_folder(args.config, args.out_dir, device=device)
    except MergeInputError as problem:
        raise BadInput(f"{args.config}: {problem}") from None
    print(f"wrote {args.out_dir} ({report.method}, {report.seconds:.2f} s on {device})")
    return EXIT_OK


def _add_merge(commands: argparse._SubParsersAction) -> None:
    summary = "build a mergekit config with soupsearch's engine (drop-in for mergekit-yaml)"
    sub = commands.add_parser("merge", help=summary, description=summary)
    sub.add_argument("config", metavar="CONFIG", help="a mergekit YAML config")
    sub.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged HF model folder")
    sub.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present, else cpu")
    sub.set_defaults(func=_merge)


def _subcommand(commands: argparse._SubParsersAction, name: str, summary: str,
                func: Callable[[argparse.Namespace], int], file: str = "an experiment YAML (see experiments/)",
                ) -> argparse.ArgumentParser:
    """A subcommand whose --help shows ``summary``; most take an experiment FILE first."""
    sub = commands.add_parser(name, help=summary, description=summary)
    if file:
        sub.add_argument("file", metavar="FILE", help=file)
    sub.set_defaults(func=func)
    return sub


def _experiment(path: str):
    from search.experiment import ExperimentError, load_experiment

    try:
        return load_experiment(path)
    except ExperimentError as problem:
        raise BadInput(str(problem)) from None


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that name a bad file, key, model, storage or tracking URI: exit 2."""
    from merge_core import MergeInputError
    from search.experiment import ExperimentError
    from search.study import StorageError
    from search.tracking import TrackingError

    return ExperimentError, MergeInputError, StorageError, TrackingError


def _validate(args: argparse.Namespace) -> int:
    from search.validate import validate

    experiment = _experiment(args.file)
    try:
        print(validate(experiment, load=args.load))
    except _user_errors() as problem:
        raise BadInput(f"{args.file}: {problem}") from None
    print(f"{args.file}: ok")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from search.study import Settings, run_study, summary

    experiment = _experiment(args.file)
    overrides = {k: getattr(args, k, None) for k in ("trials", "timeout", "storage", "tracking_uri", "device", "seed")}
    settings = Settings.of(experiment, **overrides)
    if experiment.soup is not None:
        return _soup(args, experiment, settings)
    try:
        study = run_study(experiment, settings, join=args.command == "worker")
    except _user_errors() as problem:
        raise BadInput(f"{args.file}: {problem}") from None
    print(summary(study))
    return EXIT_OK


def _soup(args: argparse.Namespace, experiment, settings) -> int:
    from search.soup import Souper, table

    if args.command == "worker":
        raise BadInput(f"{args.file}: a soup runs in one process; use `soupsearch run`")
    try:
        results = Souper(experiment, settings).run()
    except _user_errors() as problem:
        raise BadInput(f"{args.file}: {problem}") from None
    print(table(results, experiment))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from optuna.trial import TrialState

    from search.study import Settings, open_study, summary

    experiment = _experiment(args.file)
    try:
        study = open_study(experiment, Settings.of(experiment, storage=args.storage), create=False)
    except _user_errors() as problem:
        raise BadInput(f"{args.file}: {problem}") from None
    print(summary(study))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        print(f"running: trial {trial.number} on {trial.user_attrs.get('owner', '?')} since {trial.datetime_start}")
    return EXIT_OK


def _add_study_commands(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(commands, "validate", "check an experiment without running it; print the search space",
                      _validate)
    sub.add_argument("--load", action="store_true", help="also open the models and plan configs against their weights")
    for name, summary in (("run", "run or resume the study that FILE describes"),
                          ("worker", "join an existing study from another process or machine")):
        sub = _subcommand(commands, name, summary, _run)
        sub.add_argument("--trials", type=_positive_int, help="finished trials the study should reach")
        sub.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
        sub.add_argument("--storage", help="Optuna storage URL or journal file (default .soupsearch/journal.log)")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the experiment's")
        sub.add_argument("--seed", type=int, help="sampler and merge seed (default: the experiment's)")
    sub = _subcommand(commands, "status", "trials done, best so far, what is running", _status)
    sub.add_argument("--storage", help="Optuna storage URL or journal file (default: the experiment's)")


def _export(args: argparse.Namespace) -> int:
    from search.export import export
    from search.study import Settings

    experiment = _experiment(args.file)
    if args.study:
        experiment = experiment.model_copy(update={"study": experiment.study.model_copy(update={"name": args.study})})
    settings = Settings.of(experiment, storage=args.storage, tracking_uri=args.tracking_uri, device=args.device)
    try:
        record = export(experiment, settings, Path(args.out))
    except _user_errors() as problem:
        raise BadInput(f"{args.file}: {problem}") from None
    print(f"exported trial {record['trial']} to {args.out}: select {record['select_objective']:.4f}, "
          f"test {record['test_objective']:.4f} (finalists {record['finalists']})")
    return EXIT_OK


def _add_export(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(commands, "export", "export the best config YAML, exact weights, model card and test scores",
                      _export)
    sub.add_argument("--out", required=True, help="an empty or new folder for the HF model, YAML and card")
    sub.add_argument("--study", help="study name (default: the experiment's)")
    sub.add_argument("--storage", help="Optuna storage URL or journal file (default: the experiment's)")
    sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: the experiment's)")
    sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the experiment's")


def _dashboard(args: argparse.Namespace) -> int:
    import subprocess

    from search.tracking import TrackingError, dashboard_command

    uri = args.tracking_uri or (_experiment(args.file).tracking_uri if args.file else None)
    try:
        command = dashboard_command(uri, args.port)
    except TrackingError as problem:
        raise BadInput(str(problem)) from None
    print(f"MLflow UI on http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    return subprocess.run(command, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}).returncode


def _add_dashboard(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(commands, "dashboard", "MLflow UI on 127.0.0.1 for this project's store", _dashboard, file="")
    sub.add_argument("file", metavar="FILE", nargs="?", help="an experiment YAML, for its tracking_uri")
    sub.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    sub.add_argument("--port", type=_positive_int, default=5000, help="default 5000")




def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="soupsearch",
        description="Search merge configurations of fine-tuned language models, with no training.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_study_commands(commands)
    _add_export(commands)
    _add_dashboard(commands)
    _add_zoo(commands)
    _add_merge(commands)
    _add_eval(commands)
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
