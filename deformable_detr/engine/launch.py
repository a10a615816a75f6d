"""How the run was launched, checked before it trains: every process that `accelerate launch` or torchrun started
must be one that accelerate joined into the run, or each would train alone over the same files."""

import os


def check_launch(num_processes: int):
    """Several processes launched (WORLD_SIZE) but accelerate sees one: each would train alone and overwrite the
    others' output. That is what `accelerate launch` does on a machine without GPUs unless told to use CPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate runs this one alone, so "
            "each would train by itself and overwrite the others' files: on CPUs, set ACCELERATE_USE_CPU=1 in the "
            "environment of accelerate launch or torchrun"
        )
