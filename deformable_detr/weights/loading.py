"""The commands' loading policy: a saved model folder or Hub id, ours or transformers' (converted), checked before
use; a mistyped local path is named at once instead of asked of the Hub."""

import os

import torch

from ..model.configuration_deformable_detr import DeformableDetrConfig
from ..model.transformers_mapping import is_transformers_config
from .checks import refuse_unfit_weights, stored_config
from .conversion import from_transformers


def load_model(source: str):
    """A saved model folder or Hub id, ours or transformers' Deformable DETR (converted) -> our detector.

    Raises FileNotFoundError when `source` is neither a folder here nor a model on the Hub (or the folder has no
    config.json), and ValueError naming the file or the parameters when the weights cannot be read, do not fit the
    config (transformers would leave those at random) or hold NaN or infinity."""
    from safetensors import SafetensorError

    from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection
    from ..utils.console import transformers_progress_bars_off

    config = stored_config(source)
    if not is_transformers_config(config) and config.get("model_type") != DeformableDetrConfig.model_type:
        raise ValueError(f"{source} holds a {config.get('model_type')!r} model, not a Deformable DETR")
    try:
        with transformers_progress_bars_off():
            if is_transformers_config(config):
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
