"""The one reader of weight files: a local .safetensors, .pth or .bin file, or a Hub id holding one."""

import argparse
import os

import torch


def read_checkpoint(path) -> object:
    """What a local .safetensors/.pth/.bin file holds. Pickles are read with torch's weights_only loader, which here
    also admits argparse.Namespace: the original Deformable-DETR repository stores its training arguments as one
    beside the weights."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def state_dict_of(checkpoint):
    """The state dict in `checkpoint`: itself, or the one under its "state_dict" or "model" key (training scripts
    store the optimizer and their arguments beside it)."""
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    return checkpoint


def read_state_dict(source: str) -> dict:
    """The state dict of a local .safetensors/.pth/.bin file, or of a Hub id holding model.safetensors or
    pytorch_model.bin."""
    return state_dict_of(read_checkpoint(source if os.path.isfile(source) else _downloaded(source)))


def _downloaded(repo_id: str) -> str:
    """The local path of model.safetensors, else pytorch_model.bin, of a Hub model; OSError naming both failures."""
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo_id, filename)
        except Exception as error:  # offline, unknown repo, missing file: all reported together below
            errors.append(f"{filename}: {type(error).__name__}: {error}")
    raise OSError(f"weights {repo_id!r} are neither a local file nor downloadable from the Hub ({'; '.join(errors)})")
