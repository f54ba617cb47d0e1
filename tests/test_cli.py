import subprocess
import sys
from pathlib import Path

SOUPSEARCH = str(Path(sys.executable).parent / "soupsearch")


def test_console_script_has_help_for_every_command():
    top = subprocess.run([SOUPSEARCH, "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    commands = ["run", "worker", "validate", "export", "status", "dashboard", "zoo", "merge", "eval"]
    for command in commands:
        assert command in top.stdout
        sub = subprocess.run([SOUPSEARCH, command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0, command


def test_bad_arguments_exit_2():
    bad = subprocess.run([SOUPSEARCH, "zoo", "build", "--variant", "huge"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "huge" in bad.stderr


def test_every_command_takes_quiet_and_verbose():
    from search import output
    from search.cli import parser

    commands = [
        ["validate", "F"],
        ["run", "F"],
        ["worker", "F"],
        ["status", "F"],
        ["export", "F", "--out", "O"],
        ["dashboard"],
        ["zoo", "build"],
        ["zoo", "verify"],
        ["zoo", "publish"],
        ["zoo", "report"],
        ["merge", "CONFIG", "OUT"],
        ["eval", "MODEL", "--tasks", "tiny_addition"],
    ]
    for command in commands:
        assert parser().parse_args(command).verbosity == output.NORMAL, command
        assert parser().parse_args([*command, "--quiet"]).verbosity == output.QUIET, command
        assert parser().parse_args([*command, "-v"]).verbosity == output.VERBOSE, command
