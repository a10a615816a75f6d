"""The check after weights are loaded: weights that do not fit their config are named, not left at random."""

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
