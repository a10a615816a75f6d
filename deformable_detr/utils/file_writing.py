"""Writing files without losing work: `check_writable` tries a path before the work that ends in writing it,
`replaced_when_done` puts a file in place only once it is whole, and `reporting_full_disk` says a full disk in one
line. Python's own writes fail on a full disk with OSError ENOSPC; safetensors' SafetensorError and torch.save's
RuntimeError carry no errno, so for them the folder's free space after the failure decides (`is_disk_full`);
`reporting_full_disk` turns either into a `DiskFullError` naming the folder, the free space and about how much the
write needs."""

import errno
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk filled while writing `folder`."""

    def __init__(self, folder: str, needed: int):
        super().__init__(
            errno.ENOSPC,
            f"{folder}: the disk is full ({megabytes(free_space(folder))} free; writing this needs about "
            f"{megabytes(needed)}); free some space or write elsewhere",
        )
        self.folder = folder

    def __str__(self) -> str:
        return self.strerror


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def free_space(path: str) -> int:
    """The free bytes of the filesystem that holds `path`, or its nearest folder that exists."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def is_disk_full(error: BaseException, folder: str, needed: int) -> bool:
    """Whether `error`, raised while writing about `needed` bytes into `folder`, means the disk is full: an OSError
    in its chain (__cause__, __context__) with errno ENOSPC or EDQUOT says so; one with another errno says not. An
    error without an errno (safetensors', torch.save's) means a full disk where `folder` has less free space than
    the write needs."""
    errnos = [e.errno for e in _chain(error) if isinstance(e, OSError) and e.errno is not None]
    if errnos:
        return any(number in FULL_DISK_ERRNOS for number in errnos)
    return free_space(folder) < needed


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or while handling, each once."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


@contextmanager
def reporting_full_disk(folder: str, needed: int, remove_on_failure: bool = False):
    """Raises DiskFullError (from the writer's own error) when the disk fills while the block writes into
    `folder`, which is removed first if `remove_on_failure` (a half-written folder that would only take space)."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error, folder, needed):
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
        if isinstance(error, OSError) and temporary in (error.filename, error.filename2):  # named by `path`
            raise type(error)(f"{path} cannot be written ({error})") from error
        raise
