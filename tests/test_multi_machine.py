"""Training on several machines, proven on one host: two "machines" of one CPU process each (`accelerate launch
--num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1`, started at once, gloo) over one output_dir, as
on a shared filesystem, against one machine of two processes."""

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from deformable_detr.engine.launch import LAUNCHED_BY_ACCELERATE, check_launch
from tests.support.launching import launch_machines
from tests.support.processes import free_port, run_command
from tests.support.training import command_line, training_options


@pytest.fixture(scope="module")
def data(shapes_coco):
    return shapes_coco(4, 2)


def run(data, output_dir, machines: int, **changes) -> list[str]:
    """4 steps of 1 image per process on 2 processes, a checkpoint after step 2, evaluated only at the end."""
    options = training_options(data, output_dir, 1, checkpointing_steps="2", eval_every_epochs=0, **changes)
    return launch_machines(command_line(options), machines=machines)


def assert_same_weights(path, reference_path):
    weights, reference = load_file(path), load_file(reference_path)
    assert weights.keys() == reference.keys()
    for name in reference:
        assert torch.equal(weights[name], reference[name]), name


def test_two_machines_train_checkpoint_and_resume_as_one_machine_of_two_processes(data, tmp_path):
    """Bitwise the same weights: trained through, and resumed from the two machines' step-2 checkpoint; that
    checkpoint is the one machine's, file by file (each process's random states beside one copy of the rest)."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run(data, one, machines=1)
    run(data, two, machines=2)
    log = (two / "train.log").read_text()
    assert "on 2 process(es)" in log
    assert log.count("checkpoint written to") == 1  # by the main process alone, not by machine 1's too
    assert_same_weights(two / "model.safetensors", one / "model.safetensors")

    checkpoint, reference = two / "checkpoint-2", one / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)) == sorted(os.listdir(reference))
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= set(os.listdir(checkpoint))
    for name in os.listdir(reference):
        if name != "trainer_state.json":
            assert (checkpoint / name).read_bytes() == (reference / name).read_bytes(), name
    state, reference_state = (
        json.loads((folder / "trainer_state.json").read_text()) for folder in (checkpoint, reference)
    )
    assert state.pop("seconds") > 0 and reference_state.pop("seconds") > 0
    assert state == reference_state

    shutil.copytree(checkpoint, resumed / "checkpoint-2")
    run(data, resumed, machines=2, resume_from_checkpoint="latest")
    assert "resumed from" in (resumed / "train.log").read_text()
    assert_same_weights(resumed / "model.safetensors", one / "model.safetensors")


def test_machines_that_accelerate_launch_starts_alone_are_refused(data, tmp_path):
    """`accelerate launch --cpu` starts one process per machine and joins them only under MPI: machine 1 of two
    would train alone over the shared output_dir, as if it were the only one."""
    options = training_options(data, tmp_path, 1, max_steps=1, eval_every_epochs=0)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", 2, "--num_processes", 2]
    command += ["--machine_rank", 1, "--main_process_ip", "127.0.0.1", "--main_process_port", free_port()]
    command += ["-m", "deformable_detr", "train", *command_line(options)]
    result = run_command(command, env=dict(os.environ, OMP_NUM_THREADS="1"), returncode=1)
    assert (
        "accelerate launch was asked for several processes or machines (it set MASTER_ADDR=127.0.0.1)" in result.stderr
    )
    assert not (tmp_path / "model.safetensors").exists()


def test_one_process_is_refused_only_where_accelerate_launch_meant_several(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(LAUNCHED_BY_ACCELERATE, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    check_launch(1)  # one plain process, in a shell that has a MASTER_ADDR of its own
    monkeypatch.setenv(LAUNCHED_BY_ACCELERATE, "no")
    with pytest.raises(ValueError, match=r"it set MASTER_ADDR=10\.0\.0\.1.*ACCELERATE_USE_CPU=1 accelerate launch"):
        check_launch(1)
    check_launch(2)  # joined by MPI
    monkeypatch.delenv("MASTER_ADDR")
    check_launch(1)  # accelerate launch of one process
