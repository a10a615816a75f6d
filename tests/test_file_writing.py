"""A disk that fills while a checkpoint is written: one line naming the folder, the free space and the space
needed; the half-written checkpoint removed, the one before it kept and resumable."""

import errno
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections import namedtuple

import pytest
from safetensors import SafetensorError

from deformable_detr.apps.cli import train_main
from deformable_detr.engine.checkpoints import list_checkpoints
from deformable_detr.utils.file_writing import is_disk_full
from tests.support.processes import run_command
from tests.support.training import options

SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
DiskUsage = namedtuple("DiskUsage", "total used free")  # what shutil.disk_usage returns
TORCH_FULL = "[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470"


def disk_of(free: int):
    """A stand-in for shutil.disk_usage: every folder's disk has `free` bytes free."""
    return lambda path: DiskUsage(total=2**30, used=2**30 - free, free=free)


@pytest.mark.parametrize(
    "error, free, full",
    [
        (SafetensorError(SAFETENSORS_FULL), 0, True),  # safetensors and torch.save give no errno: the free space says
        (RuntimeError(TORCH_FULL), 10, True),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), 0, True),
        (SafetensorError("Error while serializing: shape mismatch"), 2**20, False),
        (OSError(errno.ENOSPC, "No space left on device"), 2**20, True),  # Python's writes give the errno
        (OSError(errno.EACCES, "Permission denied"), 0, False),
    ],
)
def test_a_full_disk_is_told_by_errno_or_by_the_free_space(error, free, full, tmp_path, monkeypatch):
    """A write of 1,000 bytes into `tmp_path` failed with `error`: the disk is full where the error's errno is
    ENOSPC, or, for a writer that gives no errno, where the folder has less free space than the write needs."""
    monkeypatch.setattr(shutil, "disk_usage", disk_of(free))
    assert is_disk_full(error, str(tmp_path), 1000) is full


def test_a_full_disk_is_told_by_an_errno_in_the_errors_chain(tmp_path):
    """torch.save's RuntimeError raised while handling an OSError ENOSPC is a full disk, whatever the free space."""
    error = RuntimeError(TORCH_FULL)
    error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(error, str(tmp_path), 0)


def test_a_checkpoint_on_a_full_disk_is_one_line_and_removed(shapes_folder, tmp_path, monkeypatch):
    """The second checkpoint's weights meet a full disk (safetensors' own error, injected, and the disk's free space
    then 0 bytes): the command ends with one line naming checkpoint-4, and only checkpoint-2 is left."""
    import accelerate.utils.other

    def save_file(tensors, path, metadata=None):
        if "checkpoint-4" in str(path):
            monkeypatch.setattr(shutil, "disk_usage", disk_of(0))
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, path, metadata=metadata)

    real = accelerate.utils.other.safe_save_file
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", save_file)
    run = options(shapes_folder, tmp_path, max_steps=6, checkpointing_steps="2", eval_every_epochs=0)
    with pytest.raises(SystemExit, match=r"^deformable-detr-train: error: .*checkpoint-4: the disk is full \(.* free"):
        train_main(shlex.split(run.command())[1:])
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path))] == ["checkpoint-2"]
    assert not os.path.exists(tmp_path / "checkpoint-4")


def small_disk(size: str):
    """A tmpfs of `size` mounted on a fresh folder, or a skip where mounting is not permitted."""
    folder = f"/tmp/deformable-detr-small-disk-{uuid.uuid4().hex[:8]}"
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    if mounted.returncode != 0:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode().strip()[:200]}")
    return folder


def test_training_onto_a_small_disk_says_so_in_one_line(shapes_folder):
    """End to end, as a user meets it: the output folder on a 20 MiB disk, the first checkpoint does not fit."""
    folder = small_disk("20m")
    try:
        run = options(shapes_folder, folder, max_steps=4, checkpointing_steps="2", eval_every_epochs=0)
        command = [sys.executable, "-m", "deformable_detr", "train", *shlex.split(run.command())[1:]]
        result = run_command(command, returncode=1, timeout=300)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("deformable-detr-train: error: ") and "checkpoint-2: the disk is full" in last, last
        assert "Traceback" not in result.stderr
        assert not os.path.exists(os.path.join(folder, "checkpoint-2"))
    finally:
        subprocess.run(["umount", folder])
        os.rmdir(folder)
