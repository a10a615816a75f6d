"""Checks before weights are loaded: weights that do not fit their config, and a local path that is not here
(named at once instead of asked of the Hub, which would take a minute of retries offline)."""

import difflib
import os

from ..utils.messages import listed


def refuse_unfit_weights(source: str, loading: dict):
    """ValueError naming the weights that do not fit the config, in from_pretrained's loading info: transformers
    would leave the missing and mismatched ones at random, with a warning, and detect nothing useful."""
    found = {
        "missing": loading["missing_keys"],
        # batch-norm step counters (timm's, in some checkpoints): frozen norms have none, and nothing reads them
        "unexpected": [key for key in loading["unexpected_keys"] if not key.endswith("num_batches_tracked")],
    }
    unfit = [f"{kind} keys [{listed(keys, 10, sort=True, quote=True)}]" for kind, keys in found.items() if keys]
    unfit += [
        f"{key} is {tuple(stored)} in the weights but {tuple(wanted)} by the config"
        for key, stored, wanted in sorted(loading["mismatched_keys"])[:10]
    ]
    if unfit:
        raise ValueError(f"{source}: the weights do not fit its config.json: {'; '.join(unfit)}")


def mistyped_local_path(source: str) -> str | None:
    """Why `source` is a local folder that is not here, rather than a Hub id: it is no valid Hub id, or its parent
    folder is here (runs/mdoel beside runs/model); None when it may be a Hub id. Asking the Hub first would take
    a minute of retries offline."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(source):
        return None
    parent = os.path.dirname(os.path.normpath(source))
    local_parent = bool(parent) and os.path.isdir(parent)
    try:
        validate_repo_id(source)
        if not local_parent:
            return None
    except HFValidationError:
        pass
    message = f"model {source}: no such folder"
    near = (
        difflib.get_close_matches(os.path.basename(os.path.normpath(source)), os.listdir(parent), 3)
        if local_parent
        else []
    )
    return message + (f"; did you mean {' or '.join(os.path.join(parent, name) for name in near)}?" if near else "")
