"""`python -m deformable_detr.cli` (and `python -m deformable_detr`): the commands as subcommands, each handed its
arguments, and a --help that lists them with an example each."""

import re
import sys

import pytest

from deformable_detr.cli import COMMANDS, main
from tests.support.processes import run_command


@pytest.mark.parametrize("module", ["deformable_detr.cli", "deformable_detr"])
def test_python_m_lists_the_commands_with_an_example_each(module):
    """`python -m deformable_detr.cli --help` printed nothing and exited 0."""
    text = run_command([sys.executable, "-m", module, "--help"], timeout=120).stdout
    for name in ("train", "evaluate", "detect", "export"):
        assert re.search(rf"^  {name} +\S.*; e\.g\.\n +python -m deformable_detr\.cli {name} \S", text, re.M), text
    assert not re.search(r"`|\w+\.py\b|\w+_\w+\(", text), text


def test_a_subcommand_gets_its_arguments_and_its_own_errors(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["detect", "--help"])
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("usage: deformable-detr-detect")
    with pytest.raises(SystemExit, match="^deformable-detr-detect: error: no image, folder or glob match for 'absent'"):
        main(["detect", "absent", "--model", "m"])
    with pytest.raises(SystemExit) as stopped:
        main(["dtect", "x"])
    assert stopped.value.code == 2 and "invalid choice: 'dtect'" in capsys.readouterr().err


def test_every_listed_command_is_one():
    import deformable_detr.cli as cli

    assert {"train", "evaluate", "detect", "export"} <= {name for name in COMMANDS if hasattr(cli, f"{name}_main")}
