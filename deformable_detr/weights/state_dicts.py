"""The one reader of weight files: a local .safetensors, .pth or .bin file, or a Hub id holding one."""

import torch


def read_state_dict(source: str) -> dict:
    """A local .safetensors/.pth/.bin file, or a Hub id holding model.safetensors or pytorch_model.bin."""
    import os

    if not os.path.isfile(source):
        from huggingface_hub import hf_hub_download

        errors = []
        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                source = hf_hub_download(source, filename)
                break
            except Exception as error:  # offline, unknown repo, missing file: all reported together below
                errors.append(f"{filename}: {type(error).__name__}: {error}")
        else:
            raise OSError(
                f"backbone weights {source!r} are neither a local file nor downloadable from the Hub "
                f"({'; '.join(errors)})"
            )
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(source)
    state = torch.load(source, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
