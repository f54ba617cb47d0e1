"""The ``soupsearch`` command line. Exit codes: 0 ok, 2 bad input (any UserError), 1 any other failure."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from search import output
from user_input import UserError, one_line
from zoo import cli as zoo_cli

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def _eval_specs(args: argparse.Namespace) -> list:
    """One TaskSpec per --tasks name; --data, --num-fewshot, --gen-kwargs, ... apply as in lm_eval."""
    from lm_eval.utils import simple_parse_args_string
    from pydantic import ValidationError

    from evals.spec import TaskSpec

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks {args.tasks!r}: name at least one lm-eval task, e.g. --tasks tiny_addition")
    if args.gen_kwargs and any("=" not in part for part in args.gen_kwargs.split(",")):
        raise UserError(f"--gen-kwargs {args.gen_kwargs!r}: expected KEY=VALUE[,KEY=VALUE], e.g. max_gen_toks=256")
    data: dict[str, dict[str, str]] = {}
    for item in args.data:
        task, _, rest = item.partition(":")
        split, _, path = rest.partition("=")
        if not (task and split and path):
            raise UserError(f"--data {item!r}: expected TASK:SPLIT=FILE, e.g. gsm8k:test=test.parquet")
        if task not in names:
            raise UserError(f"--data {item!r}: task {task!r} is not in --tasks {args.tasks}")
        if split in data.setdefault(task, {}):
            raise UserError(f"--data {item!r}: {task}:{split} is given twice (also as {data[task][split]})")
        data[task][split] = path
    options = {
        "num_fewshot": args.num_fewshot,
        "chat_template": args.chat_template,
        "system_instruction": args.system_instruction,
        "gen_kwargs": simple_parse_args_string(args.gen_kwargs) if args.gen_kwargs else None,
    }
    try:
        return [TaskSpec(task=name, data_files=data.get(name), **options) for name in names]
    except ValidationError as problem:
        raise UserError(f"--tasks {args.tasks}: {one_line(problem)}") from None


def _eval(args: argparse.Namespace) -> int:
    import json
    import logging
    import tempfile

    from evals.harness import Evaluator, check_finite, load_model
    from merge_core.parents import Parent
    from search.experiment import pick_device

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    specs = _eval_specs(args)
    model_dir = Path(args.model_dir)
    if args.json:  # checked before the work, not after it
        try:
            tempfile.TemporaryFile(dir=Path(args.json).parent).close()
            unwritable = "it is a folder" if Path(args.json).is_dir() else None
        except OSError as problem:
            unwritable = f"{Path(args.json).parent}: {problem.strerror}"
        if unwritable:
            raise UserError(f"--json {args.json}: cannot write there ({unwritable})")
    Parent.open(model_dir)  # refuses, by name, a folder without config.json or whole safetensors weights
    device = pick_device(args.device or "auto")
    try:
        model, tokenizer = load_model(model_dir, device)
        check_finite(model)
    except (OSError, ValueError, FloatingPointError) as problem:  # no or unusable tokenizer; NaN or Inf weights
        raise UserError(f"model {model_dir}: {problem}") from None
    evaluator = Evaluator(model, tokenizer, specs)
    result = evaluator.score(args.split, limit=args.limit)
    if not result.ok:  # the model, its tasks and their options are all the user's (a generation option, say)
        raise UserError(f"model {model_dir}: evaluation failed: {result.error}")
    print(result.table())
    if args.json:
        record = {
            "model": str(model_dir.resolve()),
            **result.record(),
            "splits": {name: s.record() for name, s in evaluator.splits.items()},
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return EXIT_OK


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seed(text: str) -> int:
    from search.experiment import MAX_SEED

    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    port = _positive_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 1 to 65535, got {text!r}")
    return port


def _add_eval(commands: argparse._SubParsersAction) -> None:
    summary = "score a saved model through the same evaluation path as the search"
    sub = commands.add_parser("eval", help=summary, description=summary)
    sub.add_argument("model_dir", metavar="MODEL_DIR", help="a Hugging Face model folder")
    sub.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (bundled: tiny_*)")
    sub.add_argument(
        "--split", choices=["search", "select", "test"], default="test", help="which item split to score (default test)"
    )
    sub.add_argument("--limit", type=_positive_int, help="score only the split's first N items")
    sub.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if present, else cpu)")
    sub.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK:SPLIT=FILE",
        help="local copy of a task's dataset split (.parquet/.jsonl, the hub's schema); repeatable",
    )
    sub.add_argument("--num-fewshot", type=int, help="few-shot examples for every task (default: each task's own)")
    sub.add_argument("--gen-kwargs", help="generation options for every generative task, e.g. max_gen_toks=256")
    sub.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template")
    sub.add_argument("--system-instruction", help="system instruction prepended to every prompt")
    sub.add_argument("--json", metavar="OUT", help="also write scores, per-item results and splits as JSON")
    sub.set_defaults(func=_eval)


def _merge(args: argparse.Namespace) -> int:
    from merge_core import merge_to_folder
    from search.experiment import pick_device

    device = pick_device(args.device or "auto")
    report = merge_to_folder(args.config, args.out_dir, device=device)
    print(f"wrote {args.out_dir} ({report.method}, {report.seconds:.2f} s on {device})")
    return EXIT_OK


def _add_merge(commands: argparse._SubParsersAction) -> None:
    summary = "build a mergekit config with soupsearch's engine (drop-in for mergekit-yaml)"
    sub = commands.add_parser("merge", help=summary, description=summary)
    sub.add_argument("config", metavar="CONFIG", help="a mergekit YAML config")
    sub.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged HF model folder")
    sub.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if present, else cpu")
    sub.set_defaults(func=_merge)


def _subcommand(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    func: Callable[[argparse.Namespace], int],
    file: str = "an experiment YAML (see experiments/)",
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows ``summary``; most take an experiment FILE first."""
    sub = commands.add_parser(name, help=summary, description=summary)
    if file:
        sub.add_argument("file", metavar="FILE", help=file)
    sub.set_defaults(func=func)
    return sub


def _experiment(path: str):
    from search.experiment import load_experiment

    return load_experiment(path)


def _validate(args: argparse.Namespace) -> int:
    from search.validate import validate

    experiment = _experiment(args.file)
    print(validate(experiment, load=args.load))
    print(f"{args.file}: ok")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from search.leaderboard import summary
    from search.study import Settings, run_study

    experiment = _experiment(args.file)
    overrides = {k: getattr(args, k, None) for k in ("trials", "timeout", "storage", "tracking_uri", "device", "seed")}
    settings = Settings.of(experiment, **overrides)
    if experiment.soup is not None:
        return _soup(args, experiment, settings)
    study = run_study(experiment, settings, join=args.command == "worker")
    print(summary(study))
    return EXIT_OK


def _soup(args: argparse.Namespace, experiment, settings) -> int:
    from search.soup import Souper, table

    if args.command == "worker":
        raise UserError(f"{args.file}: a soup runs in one process; use `soupsearch run`")
    souper = Souper(experiment, settings)
    results = souper.run()
    print(table(results, experiment))
    print("\n".join(souper.verdict.lines()))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from optuna.trial import TrialState

    from search.leaderboard import summary
    from search.storage import interrupted
    from search.study import Settings, open_study

    experiment = _experiment(args.file)
    study = open_study(experiment, Settings.of(experiment, storage=args.storage), create=False)
    print(summary(study))
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        owner = trial.user_attrs.get("owner", "?")
        if interrupted(trial):  # a `run` or `worker` fails it, and runs it again while trials are needed
            print(f"interrupted: trial {trial.number} on {owner}, started {trial.datetime_start}")
        else:
            print(f"running: trial {trial.number} on {owner} since {trial.datetime_start}")
    return EXIT_OK


def _add_study_commands(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(commands, "validate", "check an experiment without running it; print the search space", _validate)
    sub.add_argument("--load", action="store_true", help="also open the models and plan configs against their weights")
    for name, summary in (
        ("run", "run or resume the study that FILE describes"),
        ("worker", "join an existing study from another process or machine"),
    ):
        sub = _subcommand(commands, name, summary, _run)
        sub.add_argument("--trials", type=_positive_int, help="finished trials the study should reach")
        sub.add_argument("--timeout", type=_positive_float, help="stop starting trials after this many seconds")
        sub.add_argument("--storage", help="Optuna storage URL or journal file (default .soupsearch/journal.log)")
        sub.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
        sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the experiment's")
        sub.add_argument("--seed", type=_seed, help="sampler and merge seed (default: the experiment's)")
    sub = _subcommand(commands, "status", "trials done, best so far, what is running", _status)
    sub.add_argument("--storage", help="Optuna storage URL or journal file (default: the experiment's)")


def _export(args: argparse.Namespace) -> int:
    from search.export import export
    from search.study import Settings

    experiment = _experiment(args.file)
    if args.study:
        experiment = experiment.model_copy(update={"study": experiment.study.model_copy(update={"name": args.study})})
    settings = Settings.of(experiment, storage=args.storage, tracking_uri=args.tracking_uri, device=args.device)
    record = export(experiment, settings, Path(args.out))
    print(
        f"exported trial {record['trial']} to {args.out}: select {record['select_objective']:.4f}, "
        f"test {record['test_objective']:.4f} (finalists {record['finalists']})"
    )
    print("\n".join(record["verdict"]["lines"]))
    return EXIT_OK


def _add_export(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(
        commands, "export", "export the best config YAML, exact weights, model card and test scores", _export
    )
    sub.add_argument("--out", required=True, help="an empty or new folder for the HF model, YAML and card")
    sub.add_argument("--study", help="study name (default: the experiment's)")
    sub.add_argument("--storage", help="Optuna storage URL or journal file (default: the experiment's)")
    sub.add_argument("--tracking-uri", help="MLflow tracking URI (default: the experiment's)")
    sub.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the experiment's")


def _dashboard(args: argparse.Namespace) -> int:
    from search.tracking import dashboard

    uri = args.tracking_uri or (_experiment(args.file).tracking_uri if args.file else None)
    return dashboard(uri, args.port, server_logs=args.verbosity == output.VERBOSE)


def _add_dashboard(commands: argparse._SubParsersAction) -> None:
    sub = _subcommand(commands, "dashboard", "MLflow UI on 127.0.0.1 for this project's store", _dashboard, file="")
    sub.add_argument("file", metavar="FILE", nargs="?", help="an experiment YAML, for its tracking_uri")
    sub.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    sub.add_argument("--port", type=_port, default=5000, help="default 5000")


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, as every other bad input's are; the usage is in --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(
        prog="soupsearch",
        description="Search merge configurations of fine-tuned language models, with no training.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_study_commands(commands)
    _add_export(commands)
    _add_dashboard(commands)
    zoo_cli.add_commands(commands)
    _add_merge(commands)
    _add_eval(commands)
    _add_verbosity(top)
    return top


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    """--quiet and --verbose on every command that runs: the leaves of the command tree."""
    branches = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for branch in branches:
        for command in branch.choices.values():
            _add_verbosity(command)
    if not branches:
        shown = parser.add_mutually_exclusive_group()
        shown.add_argument(
            "-q",
            "--quiet",
            dest="verbosity",
            action="store_const",
            const=output.QUIET,
            default=output.NORMAL,
            help="results and errors only, no progress",
        )
        shown.add_argument(
            "-v",
            "--verbose",
            dest="verbosity",
            action="store_const",
            const=output.VERBOSE,
            help="also the libraries' own logs, warnings and progress bars",
        )


def _interrupted(problem: BaseException) -> bool:
    """Whether ``problem`` was raised while handling a Ctrl-C: a store's cleanup write that failed
    because the interrupt cut its transaction short, say."""
    seen = set()
    while problem is not None and id(problem) not in seen:
        if isinstance(problem, KeyboardInterrupt):
            return True
        seen.add(id(problem))
        problem = problem.__context__
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    output.configure(args.verbosity)
    try:
        return args.func(args)
    except UserError as problem:
        message = " ".join(str(problem).split())
        experiment = getattr(args, "file", None)
        if experiment:  # a command that has read an experiment file
            from search.experiment import ExperimentError

            if isinstance(problem, ExperimentError) and not message.startswith(str(Path(experiment))):
                message = f"{experiment}: {message}"  # a check made after the file was read names it too
        print(f"soupsearch: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("soupsearch: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as problem:  # noqa: BLE001 -- a bug: keep the traceback in a file, say one line here
        if _interrupted(problem):
            print("soupsearch: interrupted", file=sys.stderr)
            return EXIT_FAILURE
        import tempfile
        import traceback

        with tempfile.NamedTemporaryFile("w", prefix="soupsearch-", suffix=".log", delete=False) as log:
            traceback.print_exc(file=log)
        print(
            f"soupsearch: internal error: {type(problem).__name__}: {' '.join(str(problem).split())[:500]}"
            f" (full traceback in {log.name})",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
