"""A full disk said in one line. Writers fail on a full disk in their own words (Python: OSError ENOSPC;
safetensors: "IoError(Os { code: 28, kind: StorageFull ... })"; torch.save: "inline_container.cc ... unexpected
pos" or "file write failed"); `reporting_full_disk` turns each into a `DiskFullError` naming the folder, the free
space and about how much the write needs."""

import errno
import os
import shutil
from contextlib import contextmanager

FULL_DISK_WORDS = ("No space left on device", "StorageFull", "unexpected pos", "file write failed", "code: 28")


class DiskFullError(OSError):
    """The disk filled while writing `folder`."""

    def __init__(self, folder: str, needed: int):
        free = shutil.disk_usage(folder if os.path.isdir(folder) else os.path.dirname(folder) or ".").free
        super().__init__(
            errno.ENOSPC,
            f"{folder}: the disk is full ({megabytes(free)} free; writing this needs about {megabytes(needed)}); "
            "free some space or write elsewhere",
        )
        self.folder = folder

    def __str__(self) -> str:
        return self.strerror


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(words in str(error) for words in FULL_DISK_WORDS)


@contextmanager
def reporting_full_disk(folder: str, needed: int, remove_on_failure: bool = False):
    """Raises DiskFullError (from the writer's own error) when the disk fills while the block writes into
    `folder`, which is removed first if `remove_on_failure` (a half-written folder that would only take space)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        if remove_on_failure:
            shutil.rmtree(folder, ignore_errors=True)
        raise DiskFullError(folder, needed) from error
