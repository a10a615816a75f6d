"""Sharded training (FSDP2) where accelerate will not shard: on CPU processes (gloo), which `accelerate launch`
with an FSDP config runs as plain data parallel. The loop then calls torch's `fully_shard` itself: the weights,
gradients and AdamW's moments are split across the processes, and each layer's weights are gathered only while
it runs. Checkpoints hold one safetensors file of shards per process (no pickles); the saved model is whole.
"""

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FSDP_VARIABLE = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with `distributed_type: FSDP`


def sharding_requested() -> bool:
    return os.environ.get(FSDP_VARIABLE, "false").lower() == "true"


def check_launch(num_processes: int):
    """Several processes launched (WORLD_SIZE) but accelerate sees one: each would train alone and overwrite the
    others' output. That is what `accelerate launch` does on a machine without GPUs unless told to use CPUs."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes == 1:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but accelerate runs this one alone, so "
            "each would train by itself and overwrite the others' files: on CPUs, set ACCELERATE_USE_CPU=1 in the "
            "environment of accelerate launch or torchrun"
        )


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


def _sharded_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(model state, optimiser state, {name in the file: tensor of this process}), the states as torch's
    distributed state-dict helpers give them (names of the unsharded model)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {f"model.{name}": _local(value) for name, value in model_state.items()}
    for name, values in optimizer_state["state"].items():
        tensors |= {f"optimizer.{name}.{key}": _local(value) for key, value in values.items()}
    return model_state, optimizer_state, tensors


def save_shards(folder: str, model, optimizer, process_index: int, num_processes: int):
    """Every process writes its shards of the weights and of the optimiser state to its own file in `folder`."""
    _, optimizer_state, tensors = _sharded_state(model, optimizer)
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()},
        _shard_file(folder, process_index, num_processes),
        metadata={"param_groups": json.dumps(optimizer_state["param_groups"])},
    )


def check_resumable(folder: str, sharded: bool):
    """A checkpoint of sharded training holds no whole weights: resumed without sharding, the run would go on
    from fresh ones."""
    written = sorted(n for n in os.listdir(folder) if n.startswith("shards-"))
    if written and not sharded:
        processes = written[0].removesuffix(".safetensors").split("-of-")[-1]
        raise ValueError(
            f"{folder} holds the shards of a sharded (FSDP) run over {processes} processes ({', '.join(written)}), "
            "not whole weights: resume it as it was launched, with the FSDP config and as many CPU processes"
        )


def load_shards(folder: str, model, optimizer, process_index: int, num_processes: int):
    """Reads back what `save_shards` wrote, into the model's and the optimiser's shards. The run must have as many
    processes as the one that wrote it."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = _shard_file(folder, process_index, num_processes)
    if not os.path.isfile(path):
        written = sorted(n for n in os.listdir(folder) if n.startswith("shards-"))
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint holds {', '.join(written) or 'no shards'}; resume a sharded "
            "checkpoint with as many processes as wrote it"
        )
    model_state, optimizer_state, tensors = _sharded_state(model, optimizer)
    with safe_open(path, "pt") as saved:
        missing = sorted(set(tensors) - set(saved.keys()))
        if missing:
            raise ValueError(f"{path}: no {missing[0]} (and {len(missing) - 1} more); it is not this model's")
        for name, tensor in tensors.items():
            tensor.copy_(saved.get_tensor(name))
        optimizer_state["param_groups"] = json.loads(saved.metadata()["param_groups"])
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def gathered_shards(model) -> dict:
    """The whole weights, gathered from every process (all take part) onto the main one, in CPU memory; the
    others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
