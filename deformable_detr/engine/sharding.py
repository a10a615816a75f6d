"""Sharded training (FSDP2) where accelerate will not shard: on CPU processes (gloo), which `accelerate launch`
with an FSDP config runs as plain data parallel. The loop then calls torch's `fully_shard` itself: the weights,
gradients and AdamW's moments are split across the processes, and each layer's weights are gathered only while
it runs. Checkpoints hold one safetensors file of shards per process (no pickles); the saved model is whole.
"""

import json
import os
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FSDP_VARIABLE = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with `distributed_type: FSDP`


def sharding_requested() -> bool:
    return os.environ.get(FSDP_VARIABLE, "false").lower() == "true"


def shard(model):
    """`fully_shard` on each encoder and decoder layer, on the backbone, and on the whole model (the heads, the
    input projections and the rest); -> the same model, its parameters now DTensors."""
    from torch.distributed.fsdp import fully_shard

    detr = model.model
    for layer in [*detr.encoder.layers, *detr.decoder.layers]:
        fully_shard(layer)
    fully_shard(detr.backbone)
    fully_shard(model)
    return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a plain tensor stays as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _shard_file(folder: str, process_index: int, num_processes: int) -> str:
    return os.path.join(folder, f"shards-{process_index}-of-{num_processes}.safetensors")


def _written_shards(folder: str) -> list[str]:
    """The names of the shard files in checkpoint `folder`."""
    return sorted(n for n in os.listdir(folder) if n.startswith("shards-"))


def save_shards(folder: str, model, optimizer, process_index: int, num_processes: int, average: dict | None = None):
    """Every process writes its shards of the weights, of the optimiser state (for the parameters that have some:
    none before their first gradient) and of the weight `average` (--ema_decay) to its own file in `folder`, the
    optimiser's settings as JSON."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors = {f"model.{name}": _local(value) for name, value in get_model_state_dict(model).items()}
    if optimizer.state:  # (with none at all, torch's helper would take a step of its own to make some)
        for name, values in get_optimizer_state_dict(model, optimizer)["state"].items():
            tensors |= {f"optimizer.{name}.{key}": _local(value) for key, value in values.items()}
    tensors |= {f"ema.{name}": _local(value) for name, value in (average or {}).items()}
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()},
        _shard_file(folder, process_index, num_processes),
        metadata={"param_groups": json.dumps(settings)},
    )


def check_resumable(folder: str, sharded: bool):
    """A checkpoint of sharded training holds no whole weights: resumed without sharding, the run would go on
    from fresh ones."""
    written = _written_shards(folder)
    if written and not sharded:
        processes = written[0].removesuffix(".safetensors").split("-of-")[-1]
        raise ValueError(
            f"{folder} holds the shards of a sharded (FSDP) run over {processes} processes ({', '.join(written)}), "
            "not whole weights: resume it as it was launched, with the FSDP config and as many CPU processes"
        )


def load_shards(
    folder: str, model, optimizer, process_index: int, num_processes: int, average: dict | None = None
) -> bool:
    """Reads back what `save_shards` wrote into the model's shards, a fresh optimiser and the weight `average`;
    -> whether the file held an average (where it holds none, the average starts again from the resumed weights,
    with a warning). The run must have as many processes as the one that wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = _shard_file(folder, process_index, num_processes)
    if not os.path.isfile(path):
        written = _written_shards(folder)
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint holds {', '.join(written)}; resume it with as many processes as "
            "wrote it"
            if written
            else f"{folder} holds no shards: it was written without sharding; resume it without the FSDP config"
        )
    # (the fresh optimiser gets state for every parameter here, by a step of lr 0, for the file's to go into)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with safe_open(path, "pt") as saved:
        names = set(saved.keys())
        missing = sorted(f"model.{name}" for name in model_state if f"model.{name}" not in names)
        if missing:
            raise ValueError(f"{path}: no {missing[0]} (and {len(missing) - 1} more); it is not this model's")
        for name, value in model_state.items():
            _local(value).copy_(saved.get_tensor(f"model.{name}"))
        # parameters without a gradient so far had no optimiser state, and get none back
        optimizer_state["state"] = {
            name: values
            for name, values in optimizer_state["state"].items()
            if any(f"optimizer.{name}.{key}" in names for key in values)
        }
        for name, values in optimizer_state["state"].items():
            for key, value in values.items():
                _local(value).copy_(saved.get_tensor(f"optimizer.{name}.{key}"))
        settings = json.loads(saved.metadata()["param_groups"])
        saved_average = {name.removeprefix("ema.") for name in names if name.startswith("ema.")}
        found = average is not None and bool(saved_average)
        if found and saved_average != set(average):
            raise ValueError(f"{path}: its weight average (ema.*) is not this model's")
        for name, value in (average or {}).items():
            _local(value).copy_(saved.get_tensor(f"ema.{name}") if found else _local(model_state[name]))
    if average is not None and not found:
        warnings.warn(f"{path} holds no weight average (ema.*): it starts from the resumed weights", stacklevel=2)
    options = StateDictOptions(strict=False)  # the model's names were checked above
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
    for group, saved_settings in zip(optimizer.param_groups, settings, strict=True):
        group.update(saved_settings)
    return found


def gathered_shards(model) -> dict:
    """The whole weights, gathered from every process (all take part) onto the main one, in CPU memory; the
    others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
