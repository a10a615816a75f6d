"""`python -m deformable_detr.apps.cli` (and `python -m deformable_detr`): the commands as subcommands, each handed its
arguments, and a --help that lists them with an example each."""

import re
import sys

import pytest

from deformable_detr.apps.cli import COMMANDS, main
from tests.support.processes import run_command


@pytest.mark.parametrize("module", ["deformable_detr.apps.cli", "deformable_detr"])
def test_python_m_lists_the_commands_with_an_example_each(module):
    text = run_command([sys.executable, "-m", module, "--help"], timeout=120).stdout
    for name in ("train", "evaluate", "detect", "export", "data"):
        assert re.search(rf"^  {name} +\S.*; e\.g\.\n +python -m deformable_detr {name} \S", text, re.M), text
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
    import deformable_detr.apps.cli as cli

    assert set(COMMANDS) == {name for name in COMMANDS if hasattr(cli, f"{name}_main")}


def test_loading_and_exporting_print_no_transformers_bars_and_restore_them(tmp_path, capfd):
    """No transformers' "Loading weights 188/188" (every command's model load) or "Writing model shards 1/1" (the
    transformers export) bar is printed; its and the Hub's switches are as they were after."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils.logging import is_progress_bar_enabled

    from deformable_detr.apps.transformers_export import export_transformers
    from deformable_detr.weights.loading import load_model
    from tests.support.models import saved_detector

    saved_detector(tmp_path / "model")
    capfd.readouterr()
    load_model(str(tmp_path / "model"))
    export_transformers(str(tmp_path / "model"), str(tmp_path / "hf"))
    load_model(str(tmp_path / "hf"))  # transformers' own checkpoint, converted
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert is_progress_bar_enabled() and not are_progress_bars_disabled()


def test_evaluate_takes_a_device_checked_as_detect_checks_it(tmp_path, monkeypatch):
    """deformable-detr-evaluate takes --device; one torch cannot use here is named, as detect names it."""
    from deformable_detr.apps.cli import evaluate_parser
    from deformable_detr.utils.devices import accelerator_options

    assert evaluate_parser().parse_args(["--model", "m", "--dataset", "d", "--device", "cpu"]).device == "cpu"
    assert accelerator_options(None) == {} and accelerator_options("cpu") == {"cpu": True}
    with pytest.raises(SystemExit, match=r"^deformable-detr-evaluate: error: device 'mps': MPS is not available here"):
        main(["evaluate", "--model", str(tmp_path / "m"), "--dataset", str(tmp_path / "d"), "--device", "mps"])
    monkeypatch.setattr(
        "deformable_detr.utils.devices.checked_device", lambda device: __import__("torch").device(device)
    )
    with pytest.raises(ValueError, match=r"device 'cuda:1': give cuda without an index, .*CUDA_VISIBLE_DEVICES=1"):
        accelerator_options("cuda:1")
    assert accelerator_options("cuda") == {}
