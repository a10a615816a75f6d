"""--push_to_hub: the run's Hub repo, created before training, and the upload of output_dir after it."""

import logging
import os

from .checkpoints import BEST_DIR
from .options import TRACKING_DIR

logger = logging.getLogger(__name__)


def hub_repo(options) -> str:
    """The id of --push_to_hub's repo (--hub_model_id, else output_dir's own name), created if need be, as the Hub
    names it (`user/name`): called before training too, so that a missing token or network stops the run then, not
    after hours of training (ValueError naming the repo and the cause)."""
    from huggingface_hub import HfApi

    name = options.hub_model_id or os.path.basename(os.path.normpath(options.output_dir))
    try:
        return HfApi(token=options.hub_token).create_repo(name, private=options.hub_private_repo, exist_ok=True).repo_id
    except Exception as error:  # noqa: BLE001 -- HTTP, network and auth errors of huggingface_hub alike
        cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        raise ValueError(
            f"push_to_hub: the Hub repo {name!r} cannot be created or reached ({type(error).__name__}: {cause}); "
            "check --hub_token (or `hf auth login`) and the network, or train without --push_to_hub"
        ) from error


def push_to_hub(options, repo_id: str) -> str:
    """Uploads output_dir to `repo_id` without its checkpoints, best model copy, TensorBoard runs and log; -> the
    commit URL."""
    from huggingface_hub import HfApi

    commit = HfApi(token=options.hub_token).upload_folder(
        repo_id=repo_id,
        folder_path=options.output_dir,
        commit_message="Training run",
        ignore_patterns=["checkpoint-*", f"{BEST_DIR}/*", f"{BEST_DIR}.partial/*", f"{TRACKING_DIR}/*", "train.log"],
    )
    logger.info("pushed to %s (%s)", repo_id, commit.commit_url)
    return commit.commit_url
