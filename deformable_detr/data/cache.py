"""Loaded datasets kept on disk, so that every process and every later run memory-maps one copy instead of
converting and checking the source again: a COCO, VOC or YOLO folder's splits written once as Arrow; for a Hub or
`save_to_disk` dataset (Arrow already) what its checks found; and each image file's header, by the file's path,
size and modification time.

An entry's key is LOADER_VERSION, the loading options and the path, size and modification time of each of the
source's files, so a changed annotation file is a new key and a new entry. One process builds an entry while the
others wait on a file lock (which works however the processes were started: accelerate, torchrun, by hand); it is
written to a temporary folder and renamed, so that no reader sees half of one. The warnings that building it gave
are kept with it and given again by every load.

The cache lives in $DEFORMABLE_DETR_DATA_CACHE, by default ~/.cache/deformable_detr; `DEFORMABLE_DETR_DATA_CACHE=off`
turns it off, and deleting the folder clears it. No datasets import: the image checks (image_files.py) use it."""

import builtins
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from filelock import FileLock

LOADER_VERSION = 1  # bumped whenever a change of the loaders changes what a source becomes
CACHE_VARIABLE = "DEFORMABLE_DETR_DATA_CACHE"
RACY_SECONDS = 2.0  # a file written this recently may change again within its timestamp's tick: not cached yet
META = "meta.json"  # an entry's JSON: what the build returned, and its warnings


def cache_folder() -> str | None:
    """Where the cache lives ($DEFORMABLE_DETR_DATA_CACHE, else ~/.cache/deformable_detr, or under
    $XDG_CACHE_HOME), None where it is off."""
    value = os.environ.get(CACHE_VARIABLE, "")
    if value.lower() == "off":
        return None
    return value or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deformable_detr")


def source_key(files: list[str], options: list) -> str | None:
    """The key of an entry built from `files` with `options` (JSON-able): a digest of LOADER_VERSION, the options
    and each file's path, size and modification time (a missing file counts as such). None where a file changed in
    the last RACY_SECONDS: its timestamp could miss a change made next, so nothing built from it is kept."""
    now = time.time()
    digest = hashlib.sha256(json.dumps([LOADER_VERSION, options]).encode())
    for path in sorted(files):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            digest.update(f"{path}\0missing\n".encode())
            continue
        if now - stat.st_mtime < RACY_SECONDS:
            return None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def cached_result(key: str | None, compute: Callable[[], dict]) -> dict:
    """compute() (a JSON-able dict) run once per `key`, and read back from then on; without a key or a cache,
    compute() itself."""
    entry = cached_entry(key, lambda folder: compute())
    return compute() if entry is None else entry[1]


def cached_entry(key: str | None, write: Callable[[str], dict]) -> tuple[str, dict] | None:
    """(folder, meta) of the entry `key`, built by write(folder) -> meta where it is not there (by one process, the
    others waiting); its warnings given again. None without a key or a cache."""
    root = cache_folder()
    if root is None or key is None:
        return None
    folder = os.path.join(root, key)
    if not os.path.isdir(folder):
        os.makedirs(root, exist_ok=True)
        with FileLock(folder + ".lock"):
            if not os.path.isdir(folder):  # (built by another process while this one waited)
                _build(folder, write)
    with open(os.path.join(folder, META)) as f:
        meta = json.load(f)
    for category, message in meta.pop("warnings"):
        warnings.warn(message, getattr(builtins, category, UserWarning), stacklevel=1)  # about the data
    return folder, meta


def _build(folder: str, write: Callable[[str], dict]):
    """write(a temporary folder) -> meta, with the warnings it gives kept in the meta; then renamed `folder`."""
    partial = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=f".{os.path.basename(folder)}-")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            meta = write(partial)
        meta["warnings"] = [[w.category.__name__, str(w.message)] for w in caught]
        with open(os.path.join(partial, META), "w") as f:
            json.dump(meta, f)
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # (gone once renamed)


def cached_per_file(paths: list[str], compute: Callable[[list[str]], list], kind: str) -> list:
    """compute(paths) -> one JSON-able result per path, each kept by the file's path, size and modification time
    (in one file per folder of `paths`, under the cache's `kind`), so that only new and changed files are computed
    again. None for a path that is not there. Without a cache, compute() of every file."""
    stats = _stats(paths)
    root = cache_folder()
    shards = {}  # folder -> {file name: [size, mtime_ns, result]}
    for path in paths if root is not None else ():
        if (folder := os.path.dirname(os.path.abspath(path))) not in shards:
            shards[folder] = _read_shard(_shard_path(root, kind, folder))
    results, missed = [None] * len(paths), []
    for index, (path, stat) in enumerate(zip(paths, stats)):
        known = shards.get(os.path.dirname(os.path.abspath(path)), {}).get(os.path.basename(path))
        if known is not None and known[:2] == stat:
            results[index] = known[2]
        elif stat is not None:
            missed.append(index)
    changed, now = set(), time.time_ns()
    for index, result in zip(missed, compute([paths[i] for i in missed])):
        results[index] = result
        folder = os.path.dirname(os.path.abspath(paths[index]))
        if root is not None and now - stats[index][1] >= RACY_SECONDS * 1e9:
            shards[folder][os.path.basename(paths[index])] = [*stats[index], result]
            changed.add(folder)
    for folder in changed:
        _write_shard(_shard_path(root, kind, folder), shards[folder])
    return results


def _stats(paths: list[str], chunk: int = 10_000) -> list[list[int] | None]:
    """[size, modification time in ns] of each file, None where it is not there; in threads, as os.stat lets go of
    the interpreter lock."""

    def stats_of(part: list[str]) -> list:
        out = []
        for path in part:
            try:
                found = os.stat(path)
            except OSError:
                out.append(None)
                continue
            out.append([found.st_size, found.st_mtime_ns])
        return out

    parts = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    with ThreadPoolExecutor(max(1, min(8, len(parts)))) as pool:
        return [result for part in pool.map(stats_of, parts) for result in part]


def _shard_path(root: str, kind: str, folder: str) -> str:
    return os.path.join(root, kind, hashlib.sha256(folder.encode()).hexdigest()[:32] + ".json")


def _read_shard(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: computed again
        return {}


def _write_shard(path: str, shard: dict):
    """Written to a temporary file and renamed: a reader sees the old shard or the new one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".partial")
    with os.fdopen(handle, "w") as f:
        json.dump(shard, f)
    os.replace(partial, path)
