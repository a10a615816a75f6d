"""Checks around loading a model: its config.json, read with a missing folder or file named (a mistyped local path
at once, instead of asked of the Hub), and weights that do not fit their config, named instead of left at random."""

import os

from ..utils.local_paths import mistyped_local_path
from ..utils.messages import listed


def stored_config(source: str) -> dict:
    """The fields of the config.json of a saved model folder or Hub id. FileNotFoundError where `source` is a local
    path that is not here, a folder without config.json, or neither a folder here nor a model on the Hub."""
    from transformers import PretrainedConfig

    not_here = mistyped_local_path(source, "model")
    if not_here:
        raise FileNotFoundError(not_here)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"{os.path.join(source, 'config.json')}: no such file (a saved model is config.json beside its weights)"
        )
    try:
        return PretrainedConfig.get_config_dict(source)[0]
    except OSError as error:
        if os.path.exists(source):
            raise
        summary = str(error).strip().splitlines()[0]
        raise FileNotFoundError(f"model {source}: no such folder here, and no model on the Hub ({summary})") from None


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
