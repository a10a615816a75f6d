"""The training loop: `train(TrainingOptions(...))` trains or fine-tunes Deformable DETR on a detection dataset
with accelerate, on one or many devices (the `deformable-detr-train` command in cli.py runs it; with `accelerate
launch -m deformable_detr.engine` on several). It reads top to bottom as the paper's engine.py: `prepare`
the model, optimiser, schedule and loaders, `resume_or_start`, then per epoch `run_epoch` (forward_backward,
optimiser_step, after_step), `evaluate_epoch` and `keep_best`, and at the end `finish` (model, processor, card,
history).
Checkpoints hold everything needed to continue exactly; SIGTERM or Ctrl-C writes one first.
"""

import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..data.samples import DetectionCollator, DetectionSamples
from ..data.sources import load_detection_dataset
from ..data.transforms import DetrAugmentation
from ..metrics.evaluation import coco_ground_truth, coco_metrics, detections_of, format_metrics
from ..metrics.evaluation_plots import write_evaluation_pictures
from ..model.gradient_checkpointing import set_gradient_checkpointing
from ..model.image_processing_deformable_detr import DeformableDetrImageProcessor
from ..model.loss_deformable_detr import MAIN_TERMS
from ..model.modeling_deformable_detr import DeformableDetrForObjectDetection
from ..utils.console import transformers_progress_bars_off
from ..utils.file_writing import reporting_full_disk
from .checkpoints import (
    BEST_DIR,
    TrainState,
    evaluation_at,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .curves import write_training_curves
from .ema import WeightAverage
from .hub import hub_repo, push_to_hub
from .launch import check_launch
from .model_card import write_model_card
from .model_setup import build_model, check_hub_model, parameter_groups, warn_of_a_fresh_model
from .options import TRACKING_DIR, TrainingOptions
from .schedule import lr_factor
from .sharding import (
    check_resumable,
    gathered_shards,
    load_shards,
    save_shards,
    shard,
    sharding_requested,
)
from .signals import RESUME_HINT, StopRequest, TrainingStopped, ignore_stop_signals, worker_context
from .tracking import detections_picture, log_picture, tracker_names

logger = logging.getLogger(__name__)

PICTURED = 4  # validation images drawn for the trackers after each evaluation


@dataclass
class Run:
    """The prepared pieces of one run, and the loss terms and bad-window flag carried between its steps."""

    options: TrainingOptions
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_samples: DetectionSamples
    train_loader: Any
    steps_per_epoch: int  # optimiser steps
    max_steps: int
    ema: WeightAverage | None = None  # with --ema_decay
    running: list[dict] = field(default_factory=list)  # loss terms since the last log line
    grad_norms: list[float] = field(default_factory=list)  # gradient norms of the steps since then
    window_bad: bool = False  # the accumulation window saw a non-finite loss
    sharded: bool = False  # the model sharded by the loop itself (sharding.py), not by accelerate
    started: float = 0.0  # time.time() when the run (its first part, if resumed) would have started
    hub_repo_id: str | None = None  # with --push_to_hub, on the main process: the repo as the Hub names it
    processor: Any = None  # the evaluation's, saved with each checkpoint
    detections: list | None = None  # the last evaluation's, in COCO's results format, for its pictures at the end


def train(options: TrainingOptions) -> dict | None:
    """Trains as `options` say; returns the final validation metrics. Bad data raise ValueError /
    FileNotFoundError naming the file; a signal raises TrainingStopped after writing a checkpoint."""
    from accelerate.utils import set_seed

    if os.path.exists(options.output_dir) and not os.path.isdir(options.output_dir):
        raise ValueError(f"output_dir {options.output_dir} is a file, not a folder")
    os.makedirs(options.output_dir, exist_ok=True)
    processes = process_state(options.device)
    setup_logging(processes, options.output_dir)
    if options.model_name_or_path:
        check_hub_model(options.model_name_or_path)  # before the data: offline, say so at once
    repo_id = None  # --push_to_hub's repo, created now (on the main process), so that it fails before training
    if options.push_to_hub and processes.is_main_process:
        repo_id = hub_repo(options)
        logger.info("pushing to the Hub repo %s at the end", repo_id)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    if options.deterministic:  # cuBLAS repeats itself only with a fixed workspace (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(options.seed, deterministic=options.deterministic)

    splits, class_names = load_detection_dataset(
        options.dataset,
        options.validation_fraction,
        options.seed,
        options.skip_bad_images,
        image_size=options.image_size,
        max_image_size=options.max_image_size,
    )
    logger.info(
        "data %s: %d training and %d validation images, classes %s",
        options.dataset,
        len(splits["train"]),
        len(splits["validation"]),
        class_names,
    )
    warn_of_a_fresh_model(options, len(splits["train"]), logger)
    processor = DeformableDetrImageProcessor(
        size={"shortest_edge": options.image_size, "longest_edge": options.max_image_size}
    )
    run, eval_loader = prepare(options, splits, class_names, processor)
    run.hub_repo_id, run.processor = repo_id, processor
    accelerator = run.accelerator
    if options.deterministic and accelerator.device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"deterministic training runs on CPUs and CUDA GPUs, not on {accelerator.device}: the op's kernels "
            "there have no fixed-order backward"
        )
    warn_of_cpu_mixed_precision(accelerator)
    ground_truth = coco_ground_truth(splits["validation"], class_names)
    state = resume_or_start(run)
    num_epochs = math.ceil(run.max_steps / run.steps_per_epoch)
    logger.info(
        "training %d steps (%d epochs of %d), %d images per step, on %d process(es) (%s), mixed precision %s",
        run.max_steps,
        num_epochs,
        run.steps_per_epoch,
        options.per_device_train_batch_size * options.gradient_accumulation_steps * accelerator.num_processes,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    stop = StopRequest(logger)
    # log lines printed through tqdm while its bars are shown, on lines of their own
    with logging_redirect_tqdm(loggers=[logging.getLogger("deformable_detr")]):
        progress = tqdm(
            total=run.max_steps,
            initial=state.global_step,
            desc="training",
            # on a terminal only: redirected, its redraws would fill the log (and another bar under it moves the cursor)
            disable=None if accelerator.is_local_main_process else True,
        )
        metrics = None
        run.started = time.time() - state.seconds  # the time of the earlier parts of a resumed run counts too
        try:
            if state.global_step >= run.max_steps:  # resumed from the last step: evaluated there, unless a signal
                metrics = evaluation_at(state, state.global_step)
                if metrics is None:
                    epoch = state.epoch - (state.batches_in_epoch == 0)  # the last epoch trained in
                    metrics = evaluate_epoch(run, processor, eval_loader, ground_truth, state, epoch, stop)
                    keep_best(run, processor, state, metrics)
            for epoch in range(state.epoch, num_epochs):
                if state.global_step >= run.max_steps:
                    break
                stopping = run_epoch(run, state, epoch, stop, progress)
                finished = state.global_step >= run.max_steps
                if stopping and not finished:
                    stop_here(run, state)
                if finished or (options.eval_every_epochs and (epoch + 1) % options.eval_every_epochs == 0):
                    metrics = evaluate_epoch(run, processor, eval_loader, ground_truth, state, epoch, stop)
                    if keep_best(run, processor, state, metrics):
                        logger.info(
                            "no better %s in %d evaluations: stopping early at step %d",
                            options.metric_for_best_model,
                            state.evaluations_without_improvement,
                            state.global_step,
                        )
                        break
                if finished:
                    break
                if options.checkpointing_steps == "epoch":
                    write_checkpoint(run, state)
        finally:
            stop.restore()
            progress.close()
            torch.use_deterministic_algorithms(deterministic_before)
    finish(run, processor, state, metrics, time.time() - run.started, ground_truth)
    accelerator.end_training()
    return metrics


def process_state(device: str | None):
    """accelerate's state of the processes, known before the Accelerator (which needs the model's config) exists:
    as it, it honours ACCELERATE_USE_CPU (which makes several CPU processes one gloo group); one process runs on
    `device` where given (ValueError under a launcher of several, which places them itself)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or device == "cpu"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device is not None:
            raise ValueError(
                f"device {device!r}: the launcher places each of the {os.environ['WORLD_SIZE']} processes on its own "
                "device; leave --device out (ACCELERATE_USE_CPU=1 for CPU processes)"
            )
        return PartialState(cpu=cpu)
    PartialState._reset_state()  # one process has no process group: an earlier run's state here keeps its device
    if device is None:
        return PartialState(cpu=cpu)
    from ..utils.devices import checked_device

    device = checked_device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the fused kernels launch on the current device
    before = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)  # how accelerate takes a device for one process
    try:
        return PartialState(cpu=cpu)
    finally:
        if before is None:
            del os.environ["ACCELERATE_TORCH_DEVICE"]
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = before


def prepare(options, splits, class_names: list[str], processor) -> tuple[Run, Any]:
    """The model, optimiser, lr schedule and loaders, prepared by an Accelerator; -> (run, validation loader)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType

    model = build_model(options, class_names)
    if options.freeze_backbone:
        model.model.backbone.requires_grad_(False)
    set_gradient_checkpointing(model, options.gradient_checkpointing)
    if options.torch_compile:  # the network only: the loss's per-image targets, of any length, would recompile it
        model.model.compile()
    # with box refinement but no auxiliary loss, the earlier layers' class heads get no gradient
    unused = model.config.with_box_refine and not model.config.auxiliary_loss
    # accelerate keeps one state per process, fixed by its first Accelerator: a later run in the same process
    # (a notebook, the tests) may want another mixed precision, so that state starts afresh with each run
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=options.device == "cpu",  # (accelerate reads ACCELERATE_USE_CPU itself)
        mixed_precision=options.mixed_precision,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        log_with=tracker_names(options.report_to),
        project_dir=options.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=options.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )
    check_launch(accelerator.num_processes)
    # accelerate shards (FSDP) on GPUs only; asked to on CPU processes, it runs them as data parallel
    sharded = sharding_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU
    if sharded:
        model = shard_for(accelerator, options, model)
    elif accelerator.distributed_type == DistributedType.FSDP and options.ema_decay:
        raise ValueError(
            "ema_decay: not available with accelerate's FSDP (on GPUs) yet; leave it out, or train without FSDP"
        )
    train_samples, train_loader, eval_loader = make_loaders(options, splits, processor)
    optimizer = torch.optim.AdamW(parameter_groups(model, options), weight_decay=options.weight_decay)
    if sharded:  # the model and optimiser stay out of accelerate's hands: no DDP around the shards
        train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    else:
        model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / options.gradient_accumulation_steps)
    max_steps = options.max_steps or options.num_train_epochs * steps_per_epoch
    factor = lr_factor(options.lr_scheduler, max_steps, options.warmup_steps, options.lr_drop)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    run = Run(
        options, accelerator, model, optimizer, scheduler, train_samples, train_loader, steps_per_epoch, max_steps
    )
    run.sharded = sharded
    if options.ema_decay:
        run.ema = WeightAverage(bare(run), options.ema_decay, options.ema_warmup_steps)
    return run, eval_loader


def shard_for(accelerator, options, model):
    """The model sharded across the CPU processes (sharding.py), under bf16 autocast with mixed precision bf16."""
    refused = {
        "mixed_precision fp16": options.mixed_precision == "fp16",
        "torch_compile": options.torch_compile,
    }
    if any(refused.values()):
        raise ValueError(
            f"{', '.join(k for k, v in refused.items() if v)}: not available with sharded (FSDP) training on CPUs "
            "yet; leave it out, or train data-parallel without the FSDP config"
        )
    logger.info("sharding the model across %d CPU processes with torch's fully_shard", accelerator.num_processes)
    model = shard(model.to(accelerator.device))
    if accelerator.mixed_precision == "bf16":
        model.forward = torch.autocast(accelerator.device.type, dtype=torch.bfloat16)(model.forward)
    return model


def resume_or_start(run: Run) -> TrainState:
    """The state of --resume_from_checkpoint, or a fresh one where --output_dir holds no earlier run's
    checkpoints; opens the TensorBoard run."""
    options = run.options
    checkpoint = (
        find_checkpoint(options.resume_from_checkpoint, options.output_dir) if options.resume_from_checkpoint else None
    )
    config = bare(run).config
    setup = {
        "class_names": [config.id2label[i] for i in range(config.num_labels)],
        "model": json.loads(
            json.dumps({k: v for k, v in config.to_dict().items() if k in type(config).__annotations__})
        ),
        # a folder by its whole path: `data` and `./data` are one dataset
        "dataset": os.path.abspath(options.dataset) if os.path.exists(options.dataset) else options.dataset,
        "images_per_step": options.per_device_train_batch_size
        * options.gradient_accumulation_steps
        * run.accelerator.num_processes,
    }
    if checkpoint:
        check_resumable(checkpoint, run.sharded)
        base_lrs = list(run.scheduler.base_lrs)  # this run's options': the checkpoint brings back its own
        state = load_checkpoint(run.accelerator, checkpoint, setup)
        if state.global_step > run.max_steps:  # the model saved at the end would go back to this checkpoint's
            raise ValueError(
                f"{checkpoint} is at step {state.global_step}, beyond this run's {run.max_steps} steps: give "
                "max_steps (or num_train_epochs) at least as many, or start afresh in another output_dir"
            )
        run.scheduler.load_state_dict(state.lr_schedule)
        if run.sharded:
            accelerator, average = run.accelerator, run.ema.average if run.ema is not None else None
            found = load_shards(
                checkpoint, run.model, run.optimizer, accelerator.process_index, accelerator.num_processes, average
            )
            if run.ema is not None:
                run.ema.updates = state.ema_updates if found else 0
        elif run.ema is not None:
            run.ema.load(checkpoint, state.ema_updates, bare(run))
        apply_learning_rates(run, base_lrs, checkpoint)
    elif list_checkpoints(options.output_dir):
        raise ValueError(
            f"output_dir {options.output_dir} holds checkpoints of an earlier run: continue it with "
            'resume_from_checkpoint="latest", or start afresh in another output_dir'
        )
    elif os.path.exists(os.path.join(options.output_dir, "model.safetensors")):
        raise ValueError(
            f"output_dir {options.output_dir} holds the model of an earlier run (model.safetensors), which this one "
            "would replace: train into another output_dir, or delete it first"
        )
    else:
        state = TrainState(setup=setup)
    if options.report_to != "none":
        hyperparameters = {
            k: v for k, v in asdict(options).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"
        }
        run.accelerator.init_trackers(TRACKING_DIR, hyperparameters)
    return state


def apply_learning_rates(run: Run, base_lrs: list[float], checkpoint: str):
    """The options' learning rates (one per parameter group) and schedule (its factor at the checkpoint's step)
    in place of those a resumed checkpoint brought back: new rates, or a longer run, apply from its first step."""
    scheduler = run.scheduler
    if base_lrs != scheduler.base_lrs:
        logger.info("learning rates %s in %s, %s from now on", scheduler.base_lrs, checkpoint, base_lrs)
    scheduler.base_lrs = base_lrs
    for group, base, factor in zip(run.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]


def run_epoch(run: Run, state: TrainState, epoch: int, stop: StopRequest, progress) -> bool:
    """One pass over the training batches (the rest of it, when resumed mid-epoch), ending early at the last
    step or when a signal asked to stop (on every process together); -> whether one did."""
    accelerator, model = run.accelerator, run.model
    state.epoch = epoch
    model.train()
    if run.options.freeze_backbone:  # its batch norms keep their statistics too
        bare(run).model.backbone.eval()
    run.train_samples.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)
    batches = run.train_loader
    if state.batches_in_epoch:
        batches = accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    # accelerate divides every loss by gradient_accumulation_steps: the epoch's last window, when shorter, has its
    # losses scaled back up, so that its step is a mean over its own batches like every other
    count, window = len(run.train_loader), run.options.gradient_accumulation_steps
    short = count % window
    for batch in batches:
        in_short_window = short and state.batches_in_epoch >= count - short
        with accelerator.accumulate(model):
            outputs, finite, run.window_bad, stopping = forward_backward(
                model, batch, accelerator, run.window_bad, stop.requested, window / short if in_short_window else 1.0
            )
            if accelerator.sync_gradients:
                lr = run.optimizer.param_groups[-1]["lr"]  # this step's (the main group's): the schedule moves on
                norm = optimiser_step(
                    model, run.optimizer, run.scheduler, accelerator, run.options, state, run.window_bad, outputs.loss
                )
                if norm is not None:
                    run.grad_norms.append(norm)
                if run.ema is not None:
                    run.ema.update(bare(run))
        state.batches_in_epoch += 1
        if finite:
            run.running.append({"loss": outputs.loss.item()} | main_terms(outputs.loss_dict))
        if not accelerator.sync_gradients:
            continue
        run.window_bad = False
        state.global_step += 1
        after_step(run, state, epoch, progress, lr)
        if stopping or state.global_step >= run.max_steps:
            return stopping
    state.epoch, state.batches_in_epoch = epoch + 1, 0
    return False


def after_step(run: Run, state: TrainState, epoch: int, progress, lr: float):
    """The progress bar, a log line every logging_steps, a checkpoint every checkpointing_steps; `lr` is the one
    the step took."""
    options = run.options
    progress.update(1)
    if run.running:
        progress.set_postfix(loss=f"{run.running[-1]['loss']:.3f}", lr=f"{lr:.1e}")
    if state.global_step % options.logging_steps == 0 or state.global_step == run.max_steps:
        log_training(run.accelerator, state, run.running, lr, epoch, run.grad_norms)
        run.running, run.grad_norms = [], []
    every = options.checkpoint_every()
    if every and state.global_step % every == 0 and state.global_step < run.max_steps:
        write_checkpoint(run, state)


def evaluate_epoch(run: Run, processor, eval_loader, ground_truth: dict, state: TrainState, epoch: int, stop) -> dict:
    """The validation metrics after `epoch` (of the weight average, with --ema_decay), logged and kept in the
    history, with a picture of detections for the trackers; a signal during the evaluation stops the run."""
    from accelerate.utils import DistributedType

    accelerator = run.accelerator
    picture = None
    with averaged(run):
        run.detections = detections_of(run.model, processor, eval_loader, accelerator, stop)
        metrics = None if run.detections is None else coco_metrics(ground_truth, run.detections)
        # (sharded, every process would have to draw with the main one: no picture)
        sharded = run.sharded or accelerator.distributed_type == DistributedType.FSDP
        if metrics is not None and accelerator.trackers and accelerator.is_main_process and not sharded:
            samples = eval_loader.dataset
            images = [samples[i]["image"] for i in range(min(PICTURED, len(samples)))]
            picture = detections_picture(bare(run), processor, images)
    if metrics is None:
        final = state.global_step >= run.max_steps
        again = "it runs when the run is resumed" if final else "it is not repeated"
        logger.warning("the evaluation after epoch %d was stopped; %s", epoch + 1, again)
        stop_here(run, state)
    state.history.append({"step": state.global_step, "epoch": epoch + 1, "eval": metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "per_class"}, step=state.global_step)
    logger.info("epoch %d, step %d, validation:\n%s", epoch + 1, state.global_step, format_metrics(metrics))
    if picture is not None:
        log_picture(accelerator, "eval/detections", picture, state.global_step)
    if accelerator.is_main_process:
        write_training_curves(state.history, run.options.output_dir)
    return metrics


def keep_best(run: Run, processor, state: TrainState, metrics: dict) -> bool:
    """After an evaluation: a better metric_for_best_model saves the model (the average, with --ema_decay) and
    processor in output_dir/best/, which checkpoint rotation leaves alone; -> whether early stopping ends the run
    (early_stopping_patience evaluations in a row without a better value)."""
    options = run.options
    value = metrics[options.metric_for_best_model]
    if state.best_metric is not None and not value > state.best_metric:
        state.evaluations_without_improvement += 1
        patience = options.early_stopping_patience
        return bool(patience) and state.evaluations_without_improvement >= patience
    state.best_metric, state.best_step, state.evaluations_without_improvement = value, state.global_step, 0
    best, partial = os.path.join(options.output_dir, BEST_DIR), os.path.join(options.output_dir, BEST_DIR + ".partial")
    with averaged(run):
        weights = whole_weights(run)
        if run.accelerator.is_main_process:
            with reporting_full_disk(partial, weight_bytes(run.model), remove_on_failure=True):
                with transformers_progress_bars_off():
                    bare(run).save_pretrained(partial, state_dict=weights)
                processor.save_pretrained(partial)
                with open(os.path.join(partial, "best.json"), "w") as f:
                    json.dump({"metric": options.metric_for_best_model, "value": value, "step": state.global_step}, f)
    if run.accelerator.is_main_process:
        shutil.rmtree(best, ignore_errors=True)  # a whole new best replaces the old one
        os.replace(partial, best)
        logger.info("best %s so far, %.4f: model saved to %s", options.metric_for_best_model, value, best)
    run.accelerator.wait_for_everyone()
    return False


def stop_here(run: Run, state: TrainState):
    """After a signal: a checkpoint, then TrainingStopped."""
    checkpoint = write_checkpoint(run, state)
    logger.warning("stopped at step %d; continue with %s", state.global_step, RESUME_HINT)
    run.accelerator.end_training()
    raise TrainingStopped(StopRequest.signum, checkpoint)


def weights_spread(run: Run) -> bool:
    """Whether the weights may be split across the processes (FSDP, ours or accelerate's; DeepSpeed), so that
    every process must take part in gathering them."""
    from accelerate.utils import DistributedType

    return run.sharded or run.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def whole_weights(run: Run) -> dict:
    """The model's whole state dict under its own names, gathered where it is spread (`weights_spread`): every
    process takes part, and the main one gets it."""
    if run.sharded:
        return gathered_shards(run.model)
    if weights_spread(run):
        weights = run.accelerator.get_state_dict(run.model)
        return {name.removeprefix("_orig_mod."): tensor for name, tensor in weights.items()}  # torch.compile's
    # (not get_state_dict here: on a compiled DDP model it would take the DDP wrapper out of the training model)
    return bare(run).state_dict()


def final_weights(run: Run) -> dict:
    """The weights to save (the average, with --ema_decay) on the main process, {} on the others; where they are
    sharded, every process takes part in gathering them."""
    if weights_spread(run):
        with averaged(run):
            weights = whole_weights(run)
            # copies, where some of the gathered tensors are the model's own, which get its weights back after
            return {name: tensor.clone() for name, tensor in weights.items()} if run.ema is not None else weights
    if not run.accelerator.is_main_process:
        return {}
    return dict(run.ema.average) if run.ema is not None else bare(run).state_dict()


def bare(run: Run):
    """Our model itself, out of accelerate's wrappers (DDP) and torch.compile's: its state_dict keys are the saved
    model's."""
    return run.accelerator.unwrap_model(run.model, keep_torch_compile=False)


def write_checkpoint(run: Run, state: TrainState) -> str:
    """Writes checkpoint-{global_step}/ with the lr schedule's state and the time so far; -> its folder."""
    state.lr_schedule = run.scheduler.state_dict()
    state.seconds = time.time() - run.started
    needed = (3 + bool(run.ema)) * weight_bytes(run.model)  # the weights, AdamW's two moments, the average
    if run.ema is not None:
        state.ema_updates = run.ema.updates
    accelerator = run.accelerator
    shards = None
    if run.sharded:

        def shards(folder):
            average = run.ema.average if run.ema is not None else None
            save_shards(folder, run.model, run.optimizer, accelerator.process_index, accelerator.num_processes, average)

    def loadable(folder):
        """config.json and preprocessor_config.json beside accelerate's model.safetensors (the model's own names,
        which from_pretrained reads too): detect and evaluate load the folder as a saved model. Sharded runs write
        shards instead, which only resuming reads."""
        if run.sharded:
            return
        bare(run).config.save_pretrained(folder)
        run.processor.save_pretrained(folder)
        if run.ema is not None:
            run.ema.save(folder)

    return save_checkpoint(
        accelerator, run.options.output_dir, state, run.options.checkpoints_total_limit, needed, loadable, shards
    )


@contextmanager
def averaged(run: Run):
    """Within the block the model holds the weight average (with --ema_decay), else its own weights."""
    if run.ema is None:
        yield
    else:
        with run.ema.applied(bare(run)):
            yield


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def setup_logging(state, output_dir: str):
    """INFO to the console and output_dir/train.log from the main process; warnings from every process."""
    handlers = [logging.StreamHandler()]
    if state.is_main_process:
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    package = logging.getLogger("deformable_detr")  # this module's logger and data.py's report through it
    package.handlers = handlers
    package.setLevel(logging.INFO if state.is_main_process else logging.WARNING)
    package.propagate = False


def make_loaders(options, splits, processor):
    """(training samples, whose epoch sets the augmentation; training loader; validation loader)."""
    augmentation = None
    if not options.no_augmentation:
        augmentation = DetrAugmentation(options.image_size, options.max_image_size, options.training_scales())
    train_samples = DetectionSamples(splits["train"], augmentation, options.seed, skip_unreadable=True)
    # augmented images come resized already; the processor normalises and pads them
    train_processor = DeformableDetrImageProcessor(**{**processor.to_dict(), "do_resize": augmentation is None})
    workers = dict(
        num_workers=options.num_workers,
        worker_init_fn=ignore_stop_signals,
        multiprocessing_context=worker_context() if options.num_workers else None,
    )
    train_loader = torch.utils.data.DataLoader(
        train_samples,
        batch_size=options.per_device_train_batch_size,
        shuffle=True,
        collate_fn=DetectionCollator(train_processor),
        # its own generator: making a loader's iterator then leaves the global random state (dropout) alone
        generator=torch.Generator().manual_seed(options.seed),
        **workers,
    )
    eval_loader = torch.utils.data.DataLoader(
        DetectionSamples(splits["validation"]),
        batch_size=options.per_device_eval_batch_size,
        collate_fn=DetectionCollator(processor),
        **workers,
    )
    return train_samples, train_loader, eval_loader


def forward_backward(model, batch, accelerator, window_bad: bool, stop_requested: bool, scale: float = 1.0):
    """The loss of one batch, and its backward pass (of the loss times `scale`) unless the accumulation window
    already saw a non-finite loss. Non-finite losses and stop requests are summed over processes, so that all of
    them skip or stop together. Returns (outputs, finite on every process, window_bad, stopping)."""
    outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    bad = (~torch.isfinite(outputs.loss.detach())).float()
    flags = torch.stack([bad, torch.full_like(bad, float(stop_requested))])
    bad_processes, stopping = accelerator.reduce(flags, "sum").tolist()  # the step's one device sync before backward
    finite = not bad_processes
    window_bad = window_bad or not finite
    if not window_bad:
        accelerator.backward(outputs.loss * scale)
    return outputs, finite, window_bad, bool(stopping)


def optimiser_step(model, optimizer, scheduler, accelerator, options, state: TrainState, window_bad: bool, loss):
    """At the end of an accumulation window: clip and apply the gradients, or skip (and count) the step when the
    window saw a non-finite loss or the gradients are not finite (in fp16 the grad scaler skips such steps itself
    and lowers its scale). The lr schedule advances either way. -> the gradient norm before clipping, or None for
    a skipped step."""
    norm = None
    if not window_bad:
        norm = accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm or float("inf"))
        if hasattr(norm, "full_tensor"):  # sharded gradients give a DTensor
            norm = norm.full_tensor()
        norm = norm.item()  # the one device sync of the step's end
        if accelerator.mixed_precision != "fp16" and not math.isfinite(norm):
            window_bad, loss = True, torch.tensor(norm)
    if window_bad:
        state.skipped_steps += 1
        logger.warning(
            "step %d: non-finite loss or gradient norm (%s); the step is skipped, %d so far",
            state.global_step + 1,
            loss.item(),
            state.skipped_steps,
        )
    else:
        optimizer.step()
    optimizer.zero_grad()
    advance(scheduler)
    return None if window_bad or norm is None or not math.isfinite(norm) else norm


def advance(scheduler):
    """scheduler.step(), without torch's warning that a schedule's first step came before optimizer.step(): here
    that is a skipped first step (or fp16's grad scaler skipping it), and the schedule counts skipped steps on
    purpose. Only a step that torch would warn about runs in a catch_warnings block (a first step with no
    optimizer step before it): leaving one resets Python's once-only warnings, which would repeat at every step."""
    if scheduler._step_count != 1 or getattr(scheduler.optimizer, "_opt_called", False):
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")
        scheduler.step()


def main_terms(loss_dict: dict) -> dict:
    """The last layer's loss terms (loss_ce, loss_bbox, loss_giou) and cardinality_error, without the auxiliary
    and encoder ones."""
    return {k: v.item() for k, v in loss_dict.items() if k in MAIN_TERMS}


def warn_of_cpu_mixed_precision(accelerator):
    """Mixed precision that does not pay on the CPU, said at the start: fp16 is not applied there at all
    (accelerate computes in fp32), and bf16 on a CPU without native bf16 is far slower than fp32."""
    if accelerator.device.type != "cpu":
        return
    if accelerator.mixed_precision == "fp16":
        logger.warning("mixed precision fp16 does nothing on the CPU: accelerate computes in fp32 there (bf16 works)")
    elif accelerator.mixed_precision == "bf16" and (missing := cpu_lacks_bf16()):
        logger.warning(
            "mixed precision bf16 on a CPU without native bf16 (%s): convolutions take a slow path, up to 40x "
            "slower than fp32 (measured at 320x416); mixed_precision no is faster here",
            missing,
        )


def cpu_lacks_bf16(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """What this CPU lacks for fast bf16 (neither avx512_bf16 nor amx_bf16 among its flags), or None when it has
    one of them or its flags cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return None
    return None if flags & {"avx512_bf16", "amx_bf16"} else f"no avx512_bf16 or amx_bf16 in {cpuinfo}"


def log_training(accelerator, state: TrainState, running: list[dict], lr: float, epoch: int, grad_norms: list):
    """Logs the loss terms averaged over the steps since the last log and over the processes (every process
    holds as many, since they skip steps together), and the mean gradient norm (the same on every process)."""
    if not running:
        return
    local = torch.tensor([[r[k] for k in running[0]] for r in running], device=accelerator.device).mean(0)
    means = dict(zip(running[0], accelerator.reduce(local, "mean").tolist()))
    if grad_norms:
        means["grad_norm"] = sum(grad_norms) / len(grad_norms)
    state.history.append({"step": state.global_step, "epoch": epoch + 1, "lr": lr} | means)
    accelerator.log({f"train/{k}": v for k, v in means.items()} | {"train/lr": lr}, step=state.global_step)
    logger.info(
        "step %d, epoch %d: %s, lr %.2e%s",
        state.global_step,
        epoch + 1,
        ", ".join(f"{k} {v:.4f}" for k, v in means.items()),
        lr,
        f", {state.skipped_steps} skipped step(s)" if state.skipped_steps else "",
    )


def finish(run: Run, processor, state, metrics, seconds: float, ground_truth: dict):
    """The trained model (the weight average, with --ema_decay), processor, history, metrics, model card, training
    curves and the last evaluation's pictures (precision-recall, confusion matrix) in output_dir."""
    accelerator, options = run.accelerator, run.options
    accelerator.wait_for_everyone()
    weights = final_weights(run)
    if not accelerator.is_main_process:
        return
    if options.load_best_model_at_end and state.best_step is not None:
        with transformers_progress_bars_off():
            best = DeformableDetrForObjectDetection.from_pretrained(os.path.join(options.output_dir, BEST_DIR))
        weights = best.state_dict()
        metrics = evaluation_at(state, state.best_step)
        logger.info("the saved model is the best one, from step %d", state.best_step)
    model = bare(run)
    with reporting_full_disk(options.output_dir, weight_bytes(model)):
        with transformers_progress_bars_off():
            model.save_pretrained(options.output_dir, state_dict=weights)
        processor.save_pretrained(options.output_dir)
        with open(os.path.join(options.output_dir, "history.json"), "w") as f:
            json.dump(state.history, f, indent=1)
        write_training_curves(state.history, options.output_dir)
        if run.detections is not None:  # (none when a resumed run found its last evaluation done)
            write_evaluation_pictures(ground_truth, run.detections, options.output_dir)
        if metrics is not None:
            with open(os.path.join(options.output_dir, "eval_results.json"), "w") as f:
                json.dump(metrics, f, indent=2)
        write_model_card(
            options.output_dir,
            model.config,
            metrics,
            dataset=options.dataset,
            command=options.command(),
            steps=state.global_step,
            skipped_steps=state.skipped_steps,
            seconds=seconds,
            processes=accelerator.num_processes,
            model_id=run.hub_repo_id or options.output_dir,
        )
    logger.info("model, processor and model card saved to %s", options.output_dir)
    if run.hub_repo_id:
        push_to_hub(options, run.hub_repo_id)
