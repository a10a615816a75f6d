"""A local path that is not here, told apart from a Hub id: named at once with the nearest names here, instead of
asked of the Hub, which would take half a minute of retries offline."""

import difflib
import os


def mistyped_local_path(source: str, what: str) -> str | None:
    """Why `source` (a `what`: "model", "dataset") is a local path that is not here; None when it is here or may be a
    Hub id. A path that cannot be a Hub id (absolute, ./x, a/b/c) is local; a Hub id is taken for a local path when
    its first part is a folder here (runs/mdoel beside runs/model), or has a close name here that makes a path that
    is (dta/raccoon beside data/raccoon). The message names those nearest paths: "model runs/mdoel: no such folder;
    did you mean runs/model?"."""
    if os.path.exists(source):
        return None
    local = not _may_be_hub_id(source)
    parts = os.path.normpath(source).split(os.sep)
    if parts[0] == "":  # an absolute path
        parts[0] = os.sep
    if len(parts) < 2 and not local:
        return None
    depth = 0  # parts[:depth] is a folder here
    while depth < len(parts) - 1 and os.path.isdir(os.path.join(*parts[: depth + 1])):
        depth += 1
    folder = os.path.join(*parts[:depth]) if depth else "."
    near = difflib.get_close_matches(parts[depth], os.listdir(folder), 3, 0.6 if depth else 0.8)
    named = [os.path.join(*parts[:depth], name, *parts[depth + 1 :]) for name in near]
    if depth == 0:  # a close first part that makes no path here says nothing against a Hub id
        named = [path for path in named if os.path.exists(path)]
    message = f"{what} {source}: no such folder"
    if named:
        return f"{message}; did you mean {' or '.join(named)}?"
    if local:
        return message
    if depth == 0:
        return None
    return f"{message}; {folder} holds no folder of a close name (a {what} is a folder or a Hub id)"


def _may_be_hub_id(source: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return True
