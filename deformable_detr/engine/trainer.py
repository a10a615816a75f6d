"""The training loop: `train(TrainingOptions(...))` trains or fine-tunes Deformable DETR on a detection dataset
with accelerate, on one or many devices (the `deformable-detr-train` command in cli.py runs it; with `accelerate
launch -m deformable_detr train` on several). `Trainer.fit` reads top to bottom as the paper's engine.py: load
the data, `prepare` the model, optimiser, schedule and loaders, `resume_or_start`, then per epoch
`train_one_epoch` (a `TrainingStep` per batch: forward, backward and, at the end of each accumulation window, the
optimiser step), `evaluate` and `keep_best`, and at the end `finish` (model, processor, card, history). How the
run spreads over processes (replicated, accelerate's FSDP, sharded CPU processes) is parallel.py's.
Checkpoints hold everything needed to continue exactly; SIGTERM or Ctrl-C writes one first.
"""

import json
import logging
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator
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
    MODEL_FILE,
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
from .model_card import training_methods, write_model_card
from .model_setup import build_model, check_hub_model, parameter_groups, warn_of_a_fresh_model
from .one_to_many_heads import ONE_TO_MANY_SUFFIX
from .options import TRACKING_DIR, TrainingOptions
from .parallel import Parallel, parallel_for
from .query_groups import (
    HYBRID_SUFFIX,
    TrainingNetwork,
    TrainingQueries,
    check_resumable_queries,
    detector_of,
    training_queries,
)
from .schedule import lr_factor
from .signals import RESUME_HINT, StopRequest, TrainingStopped, ignore_stop_signals, worker_context
from .tracking import detections_picture, log_picture, tracker_names

logger = logging.getLogger(__name__)

PICTURED = 4  # validation images drawn for the trackers after each evaluation


def train(options: TrainingOptions) -> dict | None:
    """Trains as `options` say; returns the final validation metrics. Bad data raise ValueError /
    FileNotFoundError naming the file; a signal raises TrainingStopped after writing a checkpoint."""
    return Trainer(options).fit()


@dataclass
class StepOutcome:
    """What one batch came to: its forward and backward pass and, where it ends an accumulation window, the
    optimiser step."""

    loss: torch.Tensor  # the batch's loss, a scalar
    loss_parts: dict[str, float] | None  # the loss and its main terms; None where some process's loss is not finite
    stopping: bool  # a stop was asked for on some process
    window_end: bool  # the batch ended an accumulation window: the optimiser step was taken or skipped
    lr: float | None = None  # at a window's end, the lr the step took (the main group's)
    grad_norm: float | None = None  # at a window's end, the norm before clipping; None for a skipped step


class TrainingStep:
    """One batch of training on a prepared model (or TrainingNetwork, whose loss is then the batch's): the loss
    and its backward pass, and at the end of each accumulation window the clipped optimiser step, skipped (and
    counted) where the window saw a non-finite loss or gradient. Non-finite losses and stop requests are summed over
    the processes, so that all of them skip or stop together."""

    def __init__(self, model, optimizer, scheduler, accelerator: Accelerator, *, max_grad_norm: float):
        self.model, self.optimizer, self.scheduler, self.accelerator = model, optimizer, scheduler, accelerator
        self.max_grad_norm = max_grad_norm
        self.window_bad = False  # the accumulation window so far saw a non-finite loss

    def __call__(self, batch: dict, state: TrainState, *, stop_requested: bool = False, scale: float = 1.0):
        """-> StepOutcome; `scale` multiplies the loss in the backward pass."""
        with self.accelerator.accumulate(self.model):
            outputs, finite, stopping = self.forward_backward(batch, stop_requested=stop_requested, scale=scale)
            window_end = self.accelerator.sync_gradients
            lr = grad_norm = None
            if window_end:
                lr = self.optimizer.param_groups[-1]["lr"]  # this step's: the schedule moves on
                grad_norm = self.optimiser_step(state, outputs.loss)
        parts = {"loss": outputs.loss.item()} | main_terms(outputs.loss_dict) if finite else None
        return StepOutcome(outputs.loss, parts, stopping, window_end, lr, grad_norm)

    def forward_backward(self, batch: dict, *, stop_requested: bool, scale: float) -> tuple:
        """The loss of one batch, and its backward pass (of the loss times `scale`) unless the accumulation window
        already saw a non-finite loss; -> (outputs, finite on every process, stop asked for on some process)."""
        outputs = self.model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        bad = (~torch.isfinite(outputs.loss.detach())).float()
        flags = torch.stack([bad, torch.full_like(bad, float(stop_requested))])
        # the step's one device sync before backward
        bad_processes, stopping = self.accelerator.reduce(flags, "sum").tolist()
        finite = not bad_processes
        self.window_bad = self.window_bad or not finite
        if not self.window_bad:
            self.accelerator.backward(outputs.loss * scale)
        return outputs, finite, bool(stopping)

    def optimiser_step(self, state: TrainState, loss: torch.Tensor) -> float | None:
        """At the end of an accumulation window: clip and apply the gradients, or skip (and count in `state`) the
        step when the window saw a non-finite loss or the gradients are not finite (in fp16 the grad scaler skips
        such steps itself and lowers its scale). The lr schedule advances either way. -> the gradient norm before
        clipping, or None for a skipped step. The prepared module holds every parameter the optimiser steps (a
        TrainingNetwork's training-only ones too): all are clipped together."""
        skip, norm = self.window_bad, None
        if not skip:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf"))
            if hasattr(norm, "full_tensor"):  # sharded gradients give a DTensor
                norm = norm.full_tensor()
            norm = norm.item()  # the one device sync of the step's end
            if self.accelerator.mixed_precision != "fp16" and not math.isfinite(norm):
                skip, loss = True, torch.tensor(norm)
        if skip:
            state.skipped_steps += 1
            logger.warning(
                "step %d: non-finite loss or gradient norm (%s); the step is skipped, %d so far",
                state.global_step + 1,
                loss.item(),
                state.skipped_steps,
            )
        else:
            self.optimizer.step()
        self.optimizer.zero_grad()
        advance(self.scheduler)
        self.window_bad = False
        return None if skip or norm is None or not math.isfinite(norm) else norm


class Trainer:
    """One training run of `options`. `fit` prepares it and trains; the step state (loss terms and gradient norms
    since the last log line) lives on the object between steps."""

    accelerator: Accelerator
    parallel: Parallel  # how the run spreads over its processes (parallel.py)
    model: torch.nn.Module  # as prepared for training: wrapped (DDP), sharded or compiled; a TrainingNetwork too
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: TrainingStep
    queries: TrainingQueries | None  # the training-only queries and loss (query_groups, hybrid_queries, ...)
    train_samples: DetectionSamples  # whose epoch sets the augmentation
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    processor: DeformableDetrImageProcessor  # the evaluation's, saved with each checkpoint
    ground_truth: dict  # the validation split in COCO's format
    state: TrainState
    stop: StopRequest
    progress: tqdm
    steps_per_epoch: int  # optimiser steps
    max_steps: int

    def __init__(self, options: TrainingOptions):
        self.options = options
        self.ema: WeightAverage | None = None  # with --ema_decay
        self.hub_repo_id: str | None = None  # with --push_to_hub, on the main process: the repo as the Hub names it
        self.detections: list[dict] | None = None  # the last evaluation's, in COCO's results format
        self.running: list[dict[str, float]] = []  # loss terms since the last log line
        self.grad_norms: list[float] = []  # gradient norms of the steps since then
        self.started = 0.0  # time.time() when the run (its first part, if resumed) would have started

    def fit(self) -> dict | None:
        """Trains; -> the final validation metrics."""
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        self.start()
        splits, class_names = self.load_data()
        self.prepare(splits, class_names)
        self.resume_or_start()
        self.log_plan()
        self.stop = StopRequest(logger)
        # log lines printed through tqdm while its bars are shown, on lines of their own
        with logging_redirect_tqdm(loggers=[logging.getLogger("deformable_detr")]):
            self.progress = tqdm(
                total=self.max_steps,
                initial=self.state.global_step,
                desc="training",
                # on a terminal only: redirected, its redraws would fill the log (and another bar under it moves
                # the cursor)
                disable=None if self.accelerator.is_local_main_process else True,
            )
            self.started = time.time() - self.state.seconds  # the time of a resumed run's earlier parts counts too
            try:
                metrics = self.train_epochs()
            finally:
                self.stop.restore()
                self.progress.close()
                torch.use_deterministic_algorithms(deterministic_before)
        self.finish(metrics, time.time() - self.started)
        self.accelerator.end_training()
        return metrics

    def start(self):
        """The output folder, logging, the processes, the Hub repo (created now, so that it fails before training)
        and the seed."""
        from accelerate.utils import set_seed

        options = self.options
        if os.path.exists(options.output_dir) and not os.path.isdir(options.output_dir):
            raise ValueError(f"output_dir {options.output_dir} is a file, not a folder")
        os.makedirs(options.output_dir, exist_ok=True)
        processes = process_state(options.device)
        setup_logging(processes, options.output_dir)
        if options.model_name_or_path:
            check_hub_model(options.model_name_or_path)  # before the data: offline, say so at once
        if options.push_to_hub and processes.is_main_process:
            self.hub_repo_id = hub_repo(options)
            logger.info("pushing to the Hub repo %s at the end", self.hub_repo_id)
        if options.deterministic:  # cuBLAS repeats itself only with a fixed workspace (read when CUDA starts)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        set_seed(options.seed, deterministic=options.deterministic)

    def load_data(self) -> tuple[dict, list[str]]:
        """The dataset's splits and class names, and the evaluation's image processor."""
        options = self.options
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
        self.processor = DeformableDetrImageProcessor(
            size={"shortest_edge": options.image_size, "longest_edge": options.max_image_size}
        )
        return splits, class_names

    def prepare(self, splits: dict, class_names: list[str]):
        """The model, optimiser, lr schedule and loaders, prepared by an Accelerator for the run's processes."""
        model = self.build_model(class_names)
        self.options = options = self.options.with_recipe(model.config)  # --training_recipe's, for its queries
        self.accelerator = make_accelerator(options, model.config)
        check_launch(self.accelerator.num_processes)
        if options.deterministic and self.accelerator.device.type not in ("cpu", "cuda"):
            raise ValueError(
                f"deterministic training runs on CPUs and CUDA GPUs, not on {self.accelerator.device}: the op's "
                "kernels there have no fixed-order backward"
            )
        warn_of_cpu_mixed_precision(self.accelerator)
        self.parallel = parallel_for(self.accelerator, options)
        model = self.parallel.shard(self.training_network(model))
        self.train_samples, train_loader, eval_loader = make_loaders(options, splits, self.processor)
        groups = parameter_groups(detector_of(model), options) + self.queries_group()
        optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
        self.model, self.optimizer, self.train_loader, self.eval_loader = self.parallel.prepare(
            model, optimizer, train_loader, eval_loader
        )
        self.steps_per_epoch = math.ceil(len(self.train_loader) / options.gradient_accumulation_steps)
        self.max_steps = options.max_steps or options.num_train_epochs * self.steps_per_epoch
        factor = lr_factor(options.lr_scheduler, self.max_steps, options.warmup_steps, options.lr_drop)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.step = TrainingStep(
            self.model, self.optimizer, self.scheduler, self.accelerator, max_grad_norm=options.max_grad_norm
        )
        if options.ema_decay:
            self.ema = WeightAverage(self.bare_model, options.ema_decay, options.ema_warmup_steps)
        self.ground_truth = coco_ground_truth(splits["validation"], class_names)

    def training_network(self, model: DeformableDetrForObjectDetection) -> torch.nn.Module:
        """The module that trains: `model`, or with the run's training-only queries and loss (`self.queries`:
        query_groups, hybrid_queries, classification_loss) the two as one TrainingNetwork, which the processes
        then prepare, synchronise and clip as a whole."""
        self.queries = training_queries(self.options, model.config)
        return model if self.queries is None else TrainingNetwork(model, self.queries)

    def queries_group(self) -> list[dict]:
        """The optimiser's parameter group of the training-only parameters (the extra query embeddings), at the
        transformer's lr; none without any."""
        params = [] if self.queries is None else list(self.queries.parameters())
        return [{"params": params, "lr": self.options.learning_rate, "name": "queries"}] if params else []

    def build_model(self, class_names: list[str]) -> DeformableDetrForObjectDetection:
        """The run's model, its backbone frozen, its layers checkpointed or its network compiled as asked."""
        model = build_model(self.options, class_names)
        if self.options.freeze_backbone:
            model.model.backbone.requires_grad_(False)
        set_gradient_checkpointing(model, self.options.gradient_checkpointing)
        if self.options.torch_compile:  # the network only: the loss's per-image targets would recompile it
            model.model.compile()
        return model

    @property
    def bare_model(self) -> DeformableDetrForObjectDetection:
        """Our model itself, out of accelerate's wrappers and torch.compile's: its keys are the saved model's."""
        return self.parallel.bare(self.model)

    def resume_or_start(self):
        """The state of --resume_from_checkpoint, or a fresh one where --output_dir holds no earlier run's
        checkpoints or model; opens the trackers."""
        options = self.options
        checkpoint = None
        if options.resume_from_checkpoint:
            checkpoint = find_checkpoint(options.resume_from_checkpoint, options.output_dir)
        if checkpoint:
            self.resume(checkpoint)
        elif list_checkpoints(options.output_dir):
            raise ValueError(
                f"output_dir {options.output_dir} holds checkpoints of an earlier run: continue it with "
                'resume_from_checkpoint="latest", or start afresh in another output_dir'
            )
        elif os.path.exists(os.path.join(options.output_dir, "model.safetensors")):
            raise ValueError(
                f"output_dir {options.output_dir} holds the model of an earlier run (model.safetensors), which this "
                "one would replace: train into another output_dir, or delete it first"
            )
        else:
            self.state = TrainState(setup=self.setup())
        if tracker_names(options.report_to) is not None:
            self.accelerator.init_trackers(TRACKING_DIR, options.hyperparameters())

    def setup(self) -> dict:
        """What a resumed run must share with the checkpoint's: class names, model configuration, dataset, images
        per optimiser step."""
        config, options = self.bare_model.config, self.options
        return {
            "class_names": [config.id2label[i] for i in range(config.num_labels)],
            "model": json.loads(
                json.dumps({k: v for k, v in config.to_dict().items() if k in type(config).__annotations__})
            ),
            # a folder by its whole path: `data` and `./data` are one dataset
            "dataset": os.path.abspath(options.dataset) if os.path.exists(options.dataset) else options.dataset,
            "images_per_step": options.per_device_train_batch_size
            * options.gradient_accumulation_steps
            * self.accelerator.num_processes,
        }

    def resume(self, checkpoint: str):
        """The run's state, weights, optimiser, lr schedule and weight average from `checkpoint`, with this run's
        learning rates."""
        self.parallel.check_resumable(checkpoint)
        check_resumable_queries(checkpoint, self.queries)
        base_lrs = list(self.scheduler.base_lrs)  # this run's options': the checkpoint brings back its own
        # the names and shapes accelerate's model.safetensors must have (FSDP and the shards write none): our
        # model's, without DDP's "module." prefix (accelerate saves it unwrapped) nor a TrainingNetwork's other parts
        weights = self.bare_model.state_dict() if os.path.isfile(os.path.join(checkpoint, MODEL_FILE)) else None
        self.state = load_checkpoint(self.accelerator, checkpoint, self.setup(), weights)
        if self.state.global_step > self.max_steps:  # the model saved at the end would go back to the checkpoint's
            raise ValueError(
                f"{checkpoint} is at step {self.state.global_step}, beyond this run's {self.max_steps} steps: give "
                "max_steps (or num_train_epochs) at least as many, or start afresh in another output_dir"
            )
        self.scheduler.load_state_dict(self.state.lr_schedule)
        self.parallel.load_beside(checkpoint, self.model, self.optimizer, self.ema, self.state.ema_updates)
        self.apply_learning_rates(base_lrs, checkpoint)

    def apply_learning_rates(self, base_lrs: list[float], checkpoint: str):
        """The options' learning rates (one per parameter group) and schedule (its factor at the checkpoint's step)
        in place of those a resumed checkpoint brought back: new rates, or a longer run, apply from its first
        step."""
        scheduler = self.scheduler
        if base_lrs != scheduler.base_lrs:
            logger.info("learning rates %s in %s, %s from now on", scheduler.base_lrs, checkpoint, base_lrs)
        scheduler.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def log_plan(self):
        options, accelerator = self.options, self.accelerator
        logger.info(
            "training %d steps (%d epochs of %d), %d images per step, on %d process(es) (%s), mixed precision %s",
            self.max_steps,
            math.ceil(self.max_steps / self.steps_per_epoch),
            self.steps_per_epoch,
            options.per_device_train_batch_size * options.gradient_accumulation_steps * accelerator.num_processes,
            accelerator.num_processes,
            accelerator.device,
            accelerator.mixed_precision,
        )

    def train_epochs(self) -> dict | None:
        """The epochs from the state's on, each followed by an evaluation when one is due and a checkpoint with
        checkpointing_steps "epoch"; -> the last evaluation's metrics."""
        options, state, metrics = self.options, self.state, None
        if state.global_step >= self.max_steps:  # resumed from the last step: evaluated there, unless a signal
            metrics = evaluation_at(state, state.global_step)
            if metrics is None:
                metrics = self.evaluate_and_keep(state.epoch - (state.batches_in_epoch == 0))  # the last one trained
        for epoch in range(state.epoch, math.ceil(self.max_steps / self.steps_per_epoch)):
            if state.global_step >= self.max_steps:
                break
            stopping = self.train_one_epoch(epoch)
            finished = state.global_step >= self.max_steps
            if stopping and not finished:
                self.stop_here()
            if finished or (options.eval_every_epochs and (epoch + 1) % options.eval_every_epochs == 0):
                metrics = self.evaluate(epoch)
                if self.keep_best(metrics):
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
                self.write_checkpoint()
        return metrics

    def evaluate_and_keep(self, epoch: int) -> dict:
        metrics = self.evaluate(epoch)
        self.keep_best(metrics)
        return metrics

    def train_one_epoch(self, epoch: int) -> bool:
        """One pass over the training batches (the rest of it, when resumed mid-epoch), ending early at the last
        step or when a signal asked to stop (on every process together); -> whether one did."""
        state = self.state
        state.epoch = epoch
        self.model.train()
        if self.options.freeze_backbone:  # its batch norms keep their statistics too
            self.bare_model.model.backbone.eval()
        self.train_samples.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        batches = self.train_loader
        if state.batches_in_epoch:
            batches = self.accelerator.skip_first_batches(self.train_loader, state.batches_in_epoch)
        for batch in batches:
            outcome = self.step(batch, state, stop_requested=self.stop.requested, scale=self.loss_scale())
            if outcome.window_end and self.ema is not None:
                self.ema.update(self.bare_model)
            state.batches_in_epoch += 1
            if outcome.loss_parts is not None:
                self.running.append(outcome.loss_parts)
            if not outcome.window_end:
                continue
            if outcome.grad_norm is not None:
                self.grad_norms.append(outcome.grad_norm)
            state.global_step += 1
            self.after_step(epoch, outcome.lr)
            if outcome.stopping or state.global_step >= self.max_steps:
                return outcome.stopping
        state.epoch, state.batches_in_epoch = epoch + 1, 0
        return False

    def loss_scale(self) -> float:
        """accelerate divides every loss by gradient_accumulation_steps: the epoch's last window, when shorter, has
        its losses scaled back up, so that its step is a mean over its own batches like every other."""
        count, window = len(self.train_loader), self.options.gradient_accumulation_steps
        short = count % window
        return window / short if short and self.state.batches_in_epoch >= count - short else 1.0

    def after_step(self, epoch: int, lr: float):
        """The progress bar, a log line every logging_steps, a checkpoint every checkpointing_steps; `lr` is the one
        the step took."""
        state = self.state
        self.progress.update(1)
        if self.running:
            self.progress.set_postfix(loss=f"{self.running[-1]['loss']:.3f}", lr=f"{lr:.1e}")
        if state.global_step % self.options.logging_steps == 0 or state.global_step == self.max_steps:
            log_training(self.accelerator, state, self.running, lr, epoch, self.grad_norms)
            self.running, self.grad_norms = [], []
        every = self.options.checkpoint_every()
        if every and state.global_step % every == 0 and state.global_step < self.max_steps:
            self.write_checkpoint()

    @contextmanager
    def averaged(self):
        """Within the block the model holds the weight average (with --ema_decay), else its own weights."""
        with nullcontext() if self.ema is None else self.ema.applied(self.bare_model):
            yield

    def evaluate(self, epoch: int) -> dict:
        """The validation metrics after `epoch` (of the weight average, with --ema_decay), logged and kept in the
        history, with a picture of detections for the trackers; a signal during the evaluation stops the run."""
        accelerator, state, picture = self.accelerator, self.state, None
        with self.averaged():
            self.detections = detections_of(self.model, self.processor, self.eval_loader, accelerator, self.stop)
            metrics = None if self.detections is None else coco_metrics(self.ground_truth, self.detections)
            if metrics is not None and accelerator.trackers and accelerator.is_main_process:
                picture = self.detections_picture()
        if metrics is None:
            again = "it runs when the run is resumed" if state.global_step >= self.max_steps else "it is not repeated"
            logger.warning("the evaluation after epoch %d was stopped; %s", epoch + 1, again)
            self.stop_here()
        state.history.append({"step": state.global_step, "epoch": epoch + 1, "eval": metrics})
        accelerator.log({f"eval/{k}": v for k, v in metrics.items() if k != "per_class"}, step=state.global_step)
        logger.info("epoch %d, step %d, validation:\n%s", epoch + 1, state.global_step, format_metrics(metrics))
        if picture is not None:
            log_picture(accelerator, "eval/detections", picture, state.global_step)
        if accelerator.is_main_process:
            write_training_curves(state.history, self.options.output_dir)
        return metrics

    def detections_picture(self):
        """The model's detections on the first validation images, where the main process can run it alone."""
        if not self.parallel.main_runs_alone:
            return None
        samples = self.eval_loader.dataset
        images = [samples[i]["image"] for i in range(min(PICTURED, len(samples)))]
        return detections_picture(self.bare_model, self.processor, images)

    def keep_best(self, metrics: dict) -> bool:
        """After an evaluation: a better metric_for_best_model saves the model (the average, with --ema_decay) and
        processor in output_dir/best/, which checkpoint rotation leaves alone; -> whether early stopping ends the
        run (early_stopping_patience evaluations in a row without a better value)."""
        options, state = self.options, self.state
        value = metrics[options.metric_for_best_model]
        if state.best_metric is not None and not value > state.best_metric:
            state.evaluations_without_improvement += 1
            patience = options.early_stopping_patience
            return bool(patience) and state.evaluations_without_improvement >= patience
        state.best_metric, state.best_step, state.evaluations_without_improvement = value, state.global_step, 0
        best = os.path.join(options.output_dir, BEST_DIR)
        partial = os.path.join(options.output_dir, BEST_DIR + ".partial")
        with self.averaged():
            weights = self.parallel.whole_weights(self.model)
            if self.accelerator.is_main_process:
                with reporting_full_disk(partial, weight_bytes(self.model), remove_on_failure=True):
                    with transformers_progress_bars_off():
                        self.bare_model.save_pretrained(partial, state_dict=weights)
                    self.processor.save_pretrained(partial)
                    with open(os.path.join(partial, "best.json"), "w") as f:
                        record = {"metric": options.metric_for_best_model, "value": value, "step": state.global_step}
                        json.dump(record, f)
        if self.accelerator.is_main_process:
            shutil.rmtree(best, ignore_errors=True)  # a whole new best replaces the old one
            os.replace(partial, best)
            logger.info("best %s so far, %.4f: model saved to %s", options.metric_for_best_model, value, best)
        self.accelerator.wait_for_everyone()
        return False

    def write_checkpoint(self) -> str:
        """Writes checkpoint-{global_step}/ with the lr schedule's state and the time so far; -> its folder."""
        state = self.state
        state.lr_schedule = self.scheduler.state_dict()
        state.seconds = time.time() - self.started
        needed = (3 + bool(self.ema)) * weight_bytes(self.model)  # the weights, AdamW's two moments, the average
        if self.ema is not None:
            state.ema_updates = self.ema.updates

        def beside(folder: str):
            self.parallel.save_beside(folder, self.model, self.optimizer, self.ema, self.processor)
            if self.queries is not None:  # every process: sharded ones are gathered
                self.queries.save(folder, self.accelerator.is_main_process)

        options = self.options
        return save_checkpoint(
            self.accelerator, options.output_dir, state, options.checkpoints_total_limit, needed, beside
        )

    def stop_here(self):
        """After a signal: a checkpoint, then TrainingStopped."""
        checkpoint = self.write_checkpoint()
        logger.warning("stopped at step %d; continue with %s", self.state.global_step, RESUME_HINT)
        self.accelerator.end_training()
        raise TrainingStopped(StopRequest.signum, checkpoint)

    def finish(self, metrics: dict | None, seconds: float):
        """The trained model (the weight average, with --ema_decay; the best one, with --load_best_model_at_end),
        processor, history, metrics, model card, training curves and the last evaluation's pictures
        (precision-recall, confusion matrix) in output_dir, then the upload with --push_to_hub."""
        options, state = self.options, self.state
        self.accelerator.wait_for_everyone()
        weights = self.parallel.final_weights(self.model, self.ema)
        if not self.accelerator.is_main_process:
            return
        if options.load_best_model_at_end and state.best_step is not None:
            with transformers_progress_bars_off():
                best = DeformableDetrForObjectDetection.from_pretrained(os.path.join(options.output_dir, BEST_DIR))
            weights, metrics = best.state_dict(), evaluation_at(state, state.best_step)
            logger.info("the saved model is the best one, from step %d", state.best_step)
        with reporting_full_disk(options.output_dir, weight_bytes(self.bare_model)):
            self.save_outputs(weights, metrics, seconds)
        logger.info("model, processor and model card saved to %s", options.output_dir)
        if self.hub_repo_id:
            push_to_hub(options, self.hub_repo_id)

    def save_outputs(self, weights: dict[str, torch.Tensor], metrics: dict | None, seconds: float):
        """output_dir's model, processor, history.json, training curves, evaluation pictures, eval_results.json
        and model card."""
        options, state, model = self.options, self.state, self.bare_model
        with transformers_progress_bars_off():
            model.save_pretrained(options.output_dir, state_dict=weights)
        self.processor.save_pretrained(options.output_dir)
        with open(os.path.join(options.output_dir, "history.json"), "w") as f:
            json.dump(state.history, f, indent=1)
        write_training_curves(state.history, options.output_dir)
        if self.detections is not None:  # (none when a resumed run found its last evaluation done)
            write_evaluation_pictures(self.ground_truth, self.detections, options.output_dir)
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
            processes=self.accelerator.num_processes,
            model_id=self.hub_repo_id or options.output_dir,
            methods=training_methods(options),
        )


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
    PartialState._reset_state()  # one process has no process group: a former run's state here keeps its device
    if device is None:
        return PartialState(cpu=cpu)
    from ..utils.devices import checked_device

    device = checked_device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the fused kernels launch on the current device
    previous = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)  # how accelerate takes a device for one process
    try:
        return PartialState(cpu=cpu)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_TORCH_DEVICE"]
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = previous


def make_accelerator(options: TrainingOptions, config) -> Accelerator:
    """The run's Accelerator: mixed precision, accumulation, trackers, seeded sampling; DDP told of unused
    parameters where the model `config` has some."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    # with box refinement but no auxiliary loss, the earlier layers' class heads get no gradient
    unused = config.with_box_refine and not config.auxiliary_loss
    # accelerate keeps one state per process, fixed by its first Accelerator: a later run in the same process
    # (a notebook, the tests) may want another mixed precision, so that state starts afresh with each run
    AcceleratorState._reset_state()
    return Accelerator(
        cpu=options.device == "cpu",  # (accelerate reads ACCELERATE_USE_CPU itself)
        mixed_precision=options.mixed_precision,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        log_with=tracker_names(options.report_to),
        project_dir=options.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=options.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )


def make_loaders(options: TrainingOptions, splits: dict, processor: DeformableDetrImageProcessor) -> tuple:
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


def advance(scheduler: torch.optim.lr_scheduler.LRScheduler):
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


def main_terms(loss_dict: dict[str, torch.Tensor]) -> dict[str, float]:
    """The last layer's loss terms (loss_ce, loss_bbox, loss_giou) and cardinality_error, without the auxiliary
    and encoder ones; with hybrid_queries the hybrid set's too (loss_ce_hybrid, ...), with one-to-many heads theirs
    (loss_ce_one_to_many, ...)."""
    return {
        k: v.item()
        for k, v in loss_dict.items()
        if k.removesuffix(HYBRID_SUFFIX).removesuffix(ONE_TO_MANY_SUFFIX) in MAIN_TERMS
    }


def weight_bytes(model: torch.nn.Module) -> int:
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


def warn_of_cpu_mixed_precision(accelerator: Accelerator):
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


def log_training(
    accelerator: Accelerator, state: TrainState, running: list[dict], lr: float, epoch: int, grad_norms: list[float]
):
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
