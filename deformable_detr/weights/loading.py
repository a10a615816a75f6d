"""The commands' loading policy: a saved model folder or Hub id, ours or transformers' (converted), checked before
use; a mistyped local path is named at once instead of asked of the Hub."""

import os

import torch

from ..model.configuration_deformable_detr import DeformableDetrConfig
from ..utils.local_paths import mistyped_local_path
from .checks import refuse_unfit_weights
from .conversion import from_transformers


def load_model(source: str):
    """A saved model folder or Hub id, ours or transformers' Deformable DETR (converted) -> our detector.

    Raises FileNotFoundError when `source` is neither a folder here nor a model on the Hub (or the folder has no
    config.json), and ValueError naming the file or the parameters when the weights cannot be read, do not fit the
    config (transformers would leave those at random) or hold NaN or infinity."""
    from safetensors import SafetensorError
    from transformers import PretrainedConfig

    from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection
    from ..utils.console import transformers_progress_bars_off

    not_here = mistyped_local_path(source, "model")
    if not_here:
        raise FileNotFoundError(not_here)
    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(
            f"{os.path.join(source, 'config.json')}: no such file (a saved model is config.json beside its weights)"
        )
    try:
        model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    except OSError as error:
        if os.path.exists(source):
            raise
        summary = str(error).strip().splitlines()[0]
        raise FileNotFoundError(f"model {source}: no such folder here, and no model on the Hub ({summary})") from None
    if model_type not in ("deformable_detr", DeformableDetrConfig.model_type):
        raise ValueError(f"{source} holds a {model_type!r} model, not a Deformable DETR")
    try:
        with transformers_progress_bars_off():
            if model_type == "deformable_detr":  # transformers' own checkpoint
                model = from_transformers(source)
            else:
                model, loading = DeformableDetrForObjectDetection.from_pretrained(
                    source, output_loading_info=True, ignore_mismatched_sizes=True
                )
                refuse_unfit_weights(source, loading)
    except SafetensorError as error:
        weights = os.path.join(source, "model.safetensors") if os.path.isdir(source) else source
        raise ValueError(f"{weights} cannot be read: {error}") from None
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: the weights {name} hold NaN or infinity; the model cannot detect anything")
    return model
