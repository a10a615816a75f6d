"""What the commands print: transformers' own progress bars ("Loading weights 220/220", "Writing model shards 1/1")
are off while we load or save a model, since a bar for a step of a second says nothing; the Hub's download bars
stay as they were (a first download of a checkpoint takes a while)."""

import warnings
from contextlib import contextmanager


@contextmanager
def transformers_progress_bars_off():
    """transformers' tqdm bars off inside, and both transformers' and huggingface_hub's bar settings as they were
    after (transformers' switch turns the Hub's off and on too)."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    transformers_on, hub_off = logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    logging.disable_progress_bar()
    if not hub_off:
        hub.enable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS set: the Hub's switch warns that it wins
            warnings.filterwarnings("ignore", message="Cannot (enable|disable) progress bars")
            if transformers_on:
                logging.enable_progress_bar()
            (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()
