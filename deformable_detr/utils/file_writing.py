"""Writing files without losing work: `check_writable` tries a path before the work that ends in writing it,
`replaced_when_done` puts a file in place only once it is whole, and `reporting_full_disk` says a full disk in one
line. Writers fail on a full disk in their own words (Python: OSError ENOSPC;
safetensors: "IoError(Os { code: 28, kind: StorageFull ... })"; torch.save: "inline_container.cc ... unexpected
pos" or "file write failed"); `reporting_full_disk` turns each into a `DiskFullError` naming the folder, the free
space and about how much the write needs."""

import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress

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


def check_writable(path: str):
    """Creates the folder of `path` (a file to write later) and a temporary file in it, then removes that file: a
    path that cannot be written fails now, before the work, with an OSError naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise type(error)(f"{path} cannot be written ({error})") from None


@contextmanager
def replaced_when_done(path: str):
    """Yields a temporary path in `path`'s folder to write to: renamed to `path` when the block ends, removed if it
    raises or is interrupted, so `path` is never a partly written or failed file."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")  # created by the writer: usual mode
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        with suppress(OSError):
            os.remove(temporary)
        if isinstance(error, OSError) and temporary in str(error):  # named by `path`, not by the temporary file
            raise type(error)(f"{path} cannot be written ({error})") from error
        raise
