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
