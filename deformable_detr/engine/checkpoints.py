"""Training checkpoints: accelerate's state (model weights as safetensors; optimiser, random states and grad
scaler read back with torch.load(weights_only=True)) in `checkpoint-{step}/`, plus `trainer_state.json` with the
loop's position and the lr schedule (`TrainState`), written last, so that a checkpoint without it is incomplete
and ignored. Nothing in a checkpoint is unpickled as code: a checkpoint folder from elsewhere is data."""

import glob
import json
import logging
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field, fields
from types import UnionType
from typing import get_args, get_origin

import torch
from safetensors import safe_open

from ..utils.file_writing import reporting_full_disk

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"  # accelerate's weights in a checkpoint, under the prepared model's names
BEST_DIR = "best"  # the model of the best evaluation, beside the checkpoints and never rotated


@dataclass
class TrainState:
    """Where a run is: optimiser steps done, the epoch and the batches of it already seen, steps skipped for
    non-finite losses or gradients, the logged history (loss means, evaluations), the lr scheduler's state_dict
    (plain numbers), the weight average's updates, the best evaluation so far (for early stopping), and what a
    resumed run must share with it (`setup`: class names, model configuration, dataset, images per step), and the
    training time so far."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0
    history: list[dict] = field(default_factory=list)
    lr_schedule: dict = field(default_factory=dict)
    ema_updates: int = 0
    best_metric: float | None = None  # metric_for_best_model at its best so far, and the step
    best_step: int | None = None
    evaluations_without_improvement: int = 0
    setup: dict = field(default_factory=dict)
    seconds: float = 0.0  # training time so far, over every resumed part of the run


def _typed(state: TrainState) -> TrainState:
    """`state`, or TypeError naming a field read back with another type than its annotation says (a hand-edited or
    damaged file); a float field takes an int too, as JSON may write one."""
    for f in fields(TrainState):
        kinds = tuple(
            get_origin(kind) or kind for kind in (get_args(f.type) if get_origin(f.type) is UnionType else (f.type,))
        )
        kinds += (int,) if float in kinds else ()
        value = getattr(state, f.name)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise TypeError(f"{f.name} is {value!r}")
    return state


def evaluation_at(state: TrainState, step: int | None) -> dict | None:
    """The metrics of the evaluation logged at `step`, or None where there was none."""
    return next((h["eval"] for h in state.history if h.get("step") == step and "eval" in h), None)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints (with a readable trainer_state.json), oldest first; an unreadable one (a crash or a
    full disk while it was written) is left out with a warning naming it."""
    return [
        p for _, p in _checkpoint_folders(output_dir) if os.path.isfile(os.path.join(p, STATE_FILE)) and _readable(p)
    ]


def _checkpoint_folders(output_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint-{step} in output_dir, complete or not, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n.split("-")[-1].isdigit()]
    return sorted((int(n.split("-")[-1]), os.path.join(output_dir, n)) for n in names)


def _readable(folder: str) -> bool:
    try:
        with open(os.path.join(folder, STATE_FILE)) as f:
            _typed(TrainState(**json.load(f)))
        return True
    except (OSError, ValueError, TypeError) as error:
        logger.warning("%s is incomplete (%s: %s); it is ignored", folder, STATE_FILE, error)
        return False


def find_checkpoint(resume_from: str, output_dir: str) -> str | None:
    """`resume_from` is a checkpoint folder or "latest" (the newest complete one in output_dir; None if none)."""
    if resume_from != "latest":
        if not os.path.isfile(os.path.join(resume_from, STATE_FILE)) or not _readable(resume_from):
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume_from}: not a complete checkpoint (no readable {STATE_FILE})"
            )
        return resume_from
    found = list_checkpoints(output_dir)
    if not found:
        logger.warning("resume_from_checkpoint latest: no checkpoint in %s, starting afresh", output_dir)
        return None
    return found[-1]


def save_checkpoint(
    accelerator, output_dir: str, state: TrainState, keep: int, needed: int = 0, write_beside=None
) -> str:
    """Writes checkpoint-{step}/ (every process takes part, and calls `write_beside(folder)` after accelerate's
    state, before the marker), deletes all but the newest `keep`; -> its folder. A disk that fills meanwhile raises
    DiskFullError (saying that it needs about `needed` bytes), and the half-written folder is removed."""
    folder = os.path.join(output_dir, f"checkpoint-{state.global_step}")
    marker = os.path.join(folder, STATE_FILE)
    if accelerator.is_main_process and os.path.exists(marker):  # written again (a signal in a checkpoint's step):
        os.remove(marker)  # incomplete until the end, not old marker beside half-new files
    with reporting_full_disk(folder, needed, remove_on_failure=accelerator.is_main_process):
        accelerator.save_state(folder)
        if write_beside is not None:
            write_beside(folder)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_marker(folder, state)
    if accelerator.is_main_process:
        _rotate(output_dir, state.global_step, keep)
        logger.info("checkpoint written to %s", folder)
    accelerator.wait_for_everyone()
    return folder


def _write_marker(folder: str, state: TrainState):
    """trainer_state.json, through a temporary file renamed into place: the marker of a complete checkpoint is
    never half-written."""
    temporary = os.path.join(folder, STATE_FILE + ".tmp")
    with open(temporary, "w") as f:
        json.dump(asdict(state), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(folder, STATE_FILE))


def _rotate(output_dir: str, step: int, keep: int):
    """Deletes all but the newest `keep` complete checkpoints, and the incomplete ones older than `step`."""
    complete = list_checkpoints(output_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for older, path in _checkpoint_folders(output_dir):  # left half-written by a crash: never resumable
        if older < step and path not in complete:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed the incomplete %s", path)


def check_setup(folder: str, state: TrainState, setup: dict):
    """Refuses to resume a checkpoint of a run on other classes (its class heads would be trained, and saved, under
    the new names) or of another model configuration (also one that keeps the weights' shapes, which would load: another
    dropout or loss weight); warns where the dataset or the images per step differ (the epoch's position, counted in
    batches, then points elsewhere in the data)."""
    saved = state.setup
    missing = sorted(setup.keys() - saved.keys())
    if missing:
        raise ValueError(
            f"{os.path.join(folder, STATE_FILE)} has no {', '.join(missing)} in its setup: it was not written by "
            "this package's training; start afresh in another output_dir"
        )
    if saved["class_names"] != setup["class_names"]:
        raise ValueError(
            f"{folder} is a run on the classes {saved['class_names']}, the data has {setup['class_names']}: "
            "resume it on its own data, or start afresh in another output_dir"
        )
    if saved["model"] != setup["model"]:
        before, now = saved["model"], setup["model"]
        fields = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        raise ValueError(
            f"{folder} is a run of a model with {', '.join(f'{k}={before.get(k)!r}' for k in fields)}, this run's "
            f"has {', '.join(f'{k}={now.get(k)!r}' for k in fields)}: resume it with its own --config_name and "
            "--config_overrides, or start afresh in another output_dir"
        )
    for key, what in (("dataset", "dataset"), ("images_per_step", "images per optimiser step")):
        if saved[key] != setup[key]:
            warnings.warn(
                f"{folder} was written with {what} {saved[key]!r}, this run has {setup[key]!r}: it resumes at batch "
                f"{state.batches_in_epoch} of epoch {state.epoch + 1}, which is not where the earlier run stopped",
                stacklevel=3,
            )


def weight_mismatches(path: str, weights: dict[str, torch.Tensor]) -> list[str]:
    """What keeps the weights file `path` (accelerate's model.safetensors) from loading into a model whose state
    dict is `weights`: shapes that differ, names the model lacks, names the file lacks (a tensor that the model
    shares under another name, which safetensors writes once, counts as there)."""
    with safe_open(path, "pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    written = {_storage(weights[name]) for name in shapes if name in weights}
    mismatches = [
        f"size mismatch for {name}: the checkpoint's {shape}, this model's {list(weights[name].shape)}"
        for name, shape in shapes.items()
        if name in weights and list(weights[name].shape) != shape
    ]
    mismatches += [f"unexpected {name}" for name in shapes if name not in weights]
    mismatches += [
        f"missing {name}" for name, tensor in weights.items() if name not in shapes and _storage(tensor) not in written
    ]
    return mismatches


def _storage(tensor: torch.Tensor) -> tuple:
    """Where `tensor`'s values lie: equal for the names of one shared tensor."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)


def load_checkpoint(
    accelerator, folder: str, setup: dict, weights: dict[str, torch.Tensor] | None = None
) -> TrainState:
    """Restores accelerate's state from `folder` and returns the loop's, after `check_setup` against this run's
    `setup`. Refuses a folder holding pickled objects that accelerate would load with weights_only=False
    (custom_checkpoint_*.pkl, which can run code), one whose model.safetensors does not fit `weights` (the prepared
    model's state dict: another configuration), and one whose files cannot be read (a damaged checkpoint); warns
    when the random states cannot be read safely (the run then goes on, but not as it would have)."""
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = TrainState(**json.load(f))
    check_setup(folder, state, setup)
    pickled = sorted(glob.glob(os.path.join(folder, "custom_checkpoint_*.pkl")))
    if pickled:
        raise ValueError(
            f"{pickled[0]}: a pickled object, which loading would run as code; this package does not write such "
            "files (another tool did). Delete it only if you trust where the folder came from"
        )
    _check_random_states(os.path.join(folder, f"random_states_{accelerator.process_index}.pkl"))
    model_file = os.path.join(folder, MODEL_FILE)
    try:
        mismatches = (
            weight_mismatches(model_file, weights) if weights is not None and os.path.isfile(model_file) else []
        )
    except Exception as error:  # noqa: BLE001 -- safetensors' and file errors of a damaged file alike
        raise _damaged(folder, error) from error
    if mismatches:
        more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
        raise ValueError(
            f"{folder} holds a model of another configuration than this run's (--config_name, --config_overrides, "
            f"--model_name_or_path): {mismatches[0]}{more}"
        )
    try:
        accelerator.load_state(folder)
    except Exception as error:  # noqa: BLE001 -- safetensors, torch.load and file errors of a damaged folder alike
        raise _damaged(folder, error) from error
    state.setup = setup
    logger.info("resumed from %s after step %d, in epoch %d", folder, state.global_step, state.epoch + 1)
    return state


def _check_random_states(path: str):
    """Warns where accelerate cannot read the random states safely (weights_only=True), as it only logs that."""
    try:
        from accelerate.utils import load

        load(path)
    except Exception as error:  # noqa: BLE001 -- missing, corrupt or refused: all mean the same here
        warnings.warn(
            f"{path} cannot be read safely ({type(error).__name__}: {str(error).splitlines()[0][:200]}): "
            "the run continues with the current random states, so it will not repeat an uninterrupted run exactly",
            stacklevel=3,
        )


def _damaged(folder: str, error: Exception) -> ValueError:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return ValueError(
        f"{folder} cannot be read, a damaged checkpoint ({type(error).__name__}: {first[:300]}); resume from "
        "an earlier checkpoint-N, or start afresh"
    )
