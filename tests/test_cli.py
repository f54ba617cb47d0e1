import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import PLANNED, main

SOUPSEARCH = str(Path(sys.executable).parent / "soupsearch")


def test_console_script_has_help_for_every_command():
    top = subprocess.run([SOUPSEARCH, "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    for command in [*PLANNED, "zoo"]:
        assert command in top.stdout
        sub = subprocess.run([SOUPSEARCH, command, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0, command


@pytest.mark.parametrize("command", sorted(PLANNED))
def test_commands_not_built_yet_say_so_and_exit_1(command, capsys):
    assert main([command, "x"]) == 1
    assert "not built yet" in capsys.readouterr().err


def test_bad_arguments_exit_2():
    bad = subprocess.run([SOUPSEARCH, "zoo", "build", "--variant", "huge"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "huge" in bad.stderr
