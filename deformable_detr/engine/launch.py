"""How the run was launched, checked before it trains: every process that `accelerate launch` or torchrun started
must be one that accelerate joined into the run, or each would train alone over the same files (on one machine or
on several)."""

import os

# set by `accelerate launch` for every process it starts, whichever launcher it picks
LAUNCHED_BY_ACCELERATE = "ACCELERATE_MIXED_PRECISION"


def check_launch(num_processes: int):
    """Raises ValueError where the launcher meant several processes but accelerate runs this one alone (its
    `num_processes` is 1): each would train by itself and overwrite the others' output."""
    if num_processes > 1:
        return
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:  # torchrun's processes, which accelerate on a machine without GPUs does not join by itself
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate runs this one alone, so "
            "each would train by itself and overwrite the others' files: on CPUs, set ACCELERATE_USE_CPU=1 in the "
            "environment of accelerate launch or torchrun"
        )
    if LAUNCHED_BY_ACCELERATE in os.environ and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise ValueError(_ALONE_UNDER_ACCELERATE.format(address=os.environ["MASTER_ADDR"]))


# `accelerate launch --cpu` (or without --multi_gpu on a machine without GPUs) starts one process per machine, which
# only MPI (--mpirun_hostfile) joins to others; MASTER_ADDR, which it sets only for several processes or machines,
# says that others were meant
_ALONE_UNDER_ACCELERATE = (
    "accelerate launch was asked for several processes or machines (it set MASTER_ADDR={address}), but it started "
    "this process alone: without --multi_gpu (or with --cpu) it starts one process per machine and joins them only "
    "under MPI, so each machine would train by itself and overwrite the others' files. On CPUs, launch with "
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N (and --num_machines, --machine_rank, "
    "--main_process_ip on each machine); to train in one process, leave MASTER_ADDR unset"
)
