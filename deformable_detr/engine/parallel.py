"""How a run spreads over its processes, behind one interface (`parallel_for` picks it):

- `Parallel` itself: whole weights on every process: one process, or accelerate's data parallel (DDP);
- `AccelerateShards`: accelerate's FSDP (on GPUs) or DeepSpeed, whose weights may be split across the processes;
- `CpuShards`: sharded training (FSDP2) where accelerate will not shard: on CPU processes (gloo), which
  `accelerate launch` with an FSDP config runs as plain data parallel. The trainer then calls torch's
  `fully_shard` itself: the weights, gradients and AdamW's moments are split across the processes, and each
  layer's weights are gathered only while it runs. Its checkpoints hold one safetensors file of shards per process
  (no pickles); the saved model is whole.

Each prepares the model, optimiser and loaders, gathers the whole weights (every process takes part where they are
spread), and writes and reads what a checkpoint holds beside accelerate's own state. The module that trains is the
model, or a `TrainingNetwork` (the model and its training-only queries, prepared as one); the weights each gives
back are the model's own, under its names.
"""

import json
import logging
import os
import warnings
from contextlib import nullcontext

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import save_file

from .ema import WeightAverage
from .options import TrainingOptions
from .query_groups import TrainingNetwork, detector_of, detector_weights

logger = logging.getLogger(__name__)

FSDP_VARIABLE = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` with `distributed_type: FSDP`


class Parallel:
    """Whole weights on every process: one process, or accelerate's data parallel (DDP). The others below change
    what differs where the weights are spread."""

    main_runs_alone = True  # the main process can run the model by itself (to draw detections for the trackers)
    # accelerate's state holds a TrainingNetwork's training-only parts (else TrainingQueries.save's file does)
    state_holds_training_parts = False

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as it trains here, before its optimiser exists."""
        return model

    def prepare(self, model, optimizer, train_loader, eval_loader) -> tuple:
        """(model, optimizer, train_loader, eval_loader), prepared by accelerate. A TrainingNetwork's checkpoints
        then hold its model's weights alone in accelerate's model.safetensors, under the model's names, as a plain
        run's; its training-only parts go into a file of their own (`TrainingQueries.save`)."""
        prepared = self.accelerator.prepare(model, optimizer, train_loader, eval_loader)
        if isinstance(model, TrainingNetwork):
            self.accelerator.register_save_state_pre_hook(self._save_detector_weights)
            self.accelerator.register_load_state_pre_hook(self._load_into_detectors)
        return prepared

    def _save_detector_weights(self, models: list, weights: list[dict], folder: str):
        """accelerate's save_state hook: a TrainingNetwork's weights as its model's (accelerate's `weights` list
        has those of the models it saves itself: none under FSDP or DeepSpeed)."""
        for i in range(len(weights)):
            network = self.unwrapped(models[i])
            if isinstance(network, TrainingNetwork):
                weights[i] = network.detector.state_dict()

    def _load_into_detectors(self, models: list, folder: str):
        """accelerate's load_state hook: model.safetensors goes into a TrainingNetwork's model."""
        for i, model in enumerate(models):
            network = self.unwrapped(model)
            if isinstance(network, TrainingNetwork):
                models[i] = network.detector

    def unwrapped(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that trains, out of accelerate's wrappers (DDP) and torch.compile's."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)

    def bare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Our model itself, out of accelerate's wrappers (DDP), torch.compile's and a TrainingNetwork: its
        state_dict keys are the saved model's."""
        return detector_of(self.unwrapped(model))

    def whole_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's whole state dict under its own names, on the main process (and here on every one)."""
        # (not get_state_dict: on a compiled DDP model it would take the DDP wrapper out of the training model)
        return self.bare(model).state_dict()

    def final_weights(self, model: torch.nn.Module, ema: WeightAverage | None) -> dict[str, torch.Tensor]:
        """The weights to save (the average, with --ema_decay) on the main process, {} on the others."""
        if not self.accelerator.is_main_process:
            return {}
        return dict(ema.average) if ema is not None else self.bare(model).state_dict()

    def check_resumable(self, folder: str):
        """A checkpoint of sharded CPU training holds no whole weights: resumed without sharding, the run would go
        on from fresh ones."""
        written = _written_shards(folder)
        if written:
            processes = written[0].removesuffix(".safetensors").split("-of-")[-1]
            raise ValueError(
                f"{folder} holds the shards of a sharded (FSDP) run over {processes} processes ({', '.join(written)}), "
                "not whole weights: resume it as it was launched, with the FSDP config and as many CPU processes"
            )

    def save_beside(self, folder: str, model, optimizer, ema: WeightAverage | None, processor):
        """Beside accelerate's model.safetensors (the model's own names, which from_pretrained reads too), on the
        main process: config.json, preprocessor_config.json and the weight average, so that detect and evaluate
        load the checkpoint folder as a saved model."""
        if not self.accelerator.is_main_process:
            return
        self.bare(model).config.save_pretrained(folder)
        processor.save_pretrained(folder)
        if ema is not None:
            ema.save(folder)

    def load_beside(self, folder: str, model, optimizer, ema: WeightAverage | None, ema_updates: int):
        """Reads back the weight average that `save_beside` wrote and a TrainingNetwork's training-only parts
        (accelerate's state is loaded already)."""
        if ema is not None:
            ema.load(folder, ema_updates, self.bare(model))
        network = self.unwrapped(model)
        if isinstance(network, TrainingNetwork) and not self.state_holds_training_parts:
            network.queries.load(folder)


class Spread(Parallel):
    """Weights that may be split across the processes: every process takes part in gathering them."""

    def final_weights(self, model: torch.nn.Module, ema: WeightAverage | None) -> dict[str, torch.Tensor]:
        """The weights to save (the average, with --ema_decay), gathered: whole on the main process."""
        with nullcontext() if ema is None else ema.applied(self.bare(model)):
            weights = self.whole_weights(model)
            # copies, where some of the gathered tensors are the model's own, which get its weights back after
            return {name: tensor.clone() for name, tensor in weights.items()} if ema is not None else weights


class AccelerateShards(Spread):
    """accelerate's FSDP (GPUs) or DeepSpeed."""

    state_holds_training_parts = True  # FSDP and DeepSpeed save and load the whole prepared module

    def __init__(self, accelerator: Accelerator):
        super().__init__(accelerator)
        # an FSDP model runs on every process together: the main one cannot draw detections alone
        self.main_runs_alone = accelerator.distributed_type != DistributedType.FSDP

    def whole_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        weights = self.accelerator.get_state_dict(model)
        weights = {name.removeprefix("_orig_mod."): tensor for name, tensor in weights.items()}  # torch.compile's
        return detector_weights(self.unwrapped(model), weights)


class CpuShards(Spread):
    """The model sharded across CPU processes by torch's `fully_shard`, under bf16 autocast with mixed precision
    bf16; the model and optimiser stay out of accelerate's hands (no DDP around the shards)."""

    main_runs_alone = False

    def __init__(self, accelerator: Accelerator, options: TrainingOptions):
        check_shardable(options)
        super().__init__(accelerator)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        accelerator = self.accelerator
        logger.info("sharding the model across %d CPU processes with torch's fully_shard", accelerator.num_processes)
        model = shard(model.to(accelerator.device))
        if accelerator.mixed_precision == "bf16":
            model.forward = torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(model.forward)
        return model

    def prepare(self, model, optimizer, train_loader, eval_loader) -> tuple:
        return model, optimizer, *self.accelerator.prepare(train_loader, eval_loader)

    def whole_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return detector_weights(model, gathered_shards(model))

    def check_resumable(self, folder: str):
        """Any checkpoint may be tried: `load_beside` names one without this run's shards."""

    def save_beside(self, folder: str, model, optimizer, ema: WeightAverage | None, processor):
        """Every process writes its shards (no config.json: the folder holds no whole model to load)."""
        average = ema.average if ema is not None else None
        accelerator = self.accelerator
        save_shards(folder, model, optimizer, accelerator.process_index, accelerator.num_processes, average)

    def load_beside(self, folder: str, model, optimizer, ema: WeightAverage | None, ema_updates: int):
        accelerator, average = self.accelerator, ema.average if ema is not None else None
        found = load_shards(folder, model, optimizer, accelerator.process_index, accelerator.num_processes, average)
        if ema is not None:
            ema.updates = ema_updates if found else 0


def parallel_for(accelerator: Accelerator, options: TrainingOptions) -> Parallel:
    """How this run spreads: accelerate shards (FSDP) on GPUs only; asked to on CPU processes, it runs them as data
    parallel, and `CpuShards` shards them instead."""
    if sharding_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        return CpuShards(accelerator, options)
    if accelerator.distributed_type == DistributedType.FSDP and options.ema_decay:
        raise ValueError(
            "ema_decay: not available with accelerate's FSDP (on GPUs) yet; leave it out, or train without FSDP"
        )
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        flat = accelerator.distributed_type == DistributedType.DEEPSPEED or not accelerator.is_fsdp2
        if flat and (options.query_groups > 1 or options.hybrid_queries or options.one_to_many_heads):
            # their checkpoint file is gathered from DTensors: FSDP1's and DeepSpeed's flat shards are none
            raise ValueError(
                "query_groups, hybrid_queries, one_to_many_heads: not available with accelerate's FSDP version 1 or "
                "DeepSpeed; use FSDP2 (fsdp_version: 2), or train data-parallel"
            )
        return AccelerateShards(accelerator)
    return Parallel(accelerator)


def sharding_requested() -> bool:
    return os.environ.get(FSDP_VARIABLE, "false").lower() == "true"


def check_shardable(options: TrainingOptions):
    """ValueError naming the options that sharded training on CPUs does not take."""
    refused = {
        "mixed_precision fp16": options.mixed_precision == "fp16",
        "torch_compile": options.torch_compile,
    }
    if any(refused.values()):
        raise ValueError(
            f"{', '.join(k for k, v in refused.items() if v)}: not available with sharded (FSDP) training on CPUs "
            "yet; leave it out, or train data-parallel without the FSDP config"
        )


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """`fully_shard` on each encoder and decoder layer, on the backbone, and on the whole model (the heads, the
    input projections and the rest; with a TrainingNetwork, its training-only parts too); -> the same model, its
    parameters now DTensors."""
    from torch.distributed.fsdp import fully_shard

    detr = detector_of(model).model
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


def _shard_path(folder: str, process_index: int, num_processes: int) -> str:
    """This process's shard file in `folder`, or FileNotFoundError naming what the folder holds instead."""
    path = _shard_file(folder, process_index, num_processes)
    if not os.path.isfile(path):
        written = _written_shards(folder)
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint holds {', '.join(written)}; resume it with as many processes as "
            "wrote it"
            if written
            else f"{folder} holds no shards: it was written without sharding; resume it without the FSDP config"
        )
    return path


def load_shards(
    folder: str, model, optimizer, process_index: int, num_processes: int, average: dict | None = None
) -> bool:
    """Reads back what `save_shards` wrote into the model's shards, a fresh optimiser and the weight `average`;
    -> whether the file held an average (where it holds none, the average starts again from the resumed weights,
    with a warning). The run must have as many processes as the one that wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = _shard_path(folder, process_index, num_processes)
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
        found = _load_average(saved, path, names, average, detector_weights(model, model_state))
    options = StateDictOptions(strict=False)  # the model's names were checked above
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
    for group, saved_settings in zip(optimizer.param_groups, settings, strict=True):
        group.update(saved_settings)
    return found


def _load_average(saved, path: str, names: set[str], average: dict | None, model_state: dict) -> bool:
    """The shard file's weight average (ema.*) into `average`, or the resumed weights where it holds none (with a
    warning); -> whether it held one."""
    saved_average = {name.removeprefix("ema.") for name in names if name.startswith("ema.")}
    found = average is not None and bool(saved_average)
    if found and saved_average != set(average):
        raise ValueError(f"{path}: its weight average (ema.*) is not this model's")
    for name, value in (average or {}).items():
        _local(value).copy_(saved.get_tensor(f"ema.{name}") if found else _local(model_state[name]))
    if average is not None and not found:
        warnings.warn(f"{path} holds no weight average (ema.*): it starts from the resumed weights", stacklevel=3)
    return found


def gathered_shards(model) -> dict:
    """The whole weights, gathered from every process (all take part) onto the main one, in CPU memory; the
    others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
