"""Train or fine-tune Deformable DETR on a detection dataset with accelerate: the `deformable-detr-train`
command (also `scripts/train.py`). Run it with `python`, or with `accelerate launch` for several devices.

The defaults are the paper's recipe: AdamW, lr 2e-4, backbone lr 2e-5, 0.1x lr for the sampling offsets and
reference points, weight decay 1e-4, gradient norm clipped at 0.1, lr x0.1 after 80% of the steps, and DETR's
augmentation. Checkpoints hold everything needed to continue exactly; SIGTERM or Ctrl-C writes one first.
"""

import argparse
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from . import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor
from .checkpoints import TrainState, find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .data import DetectionCollator, DetectionSamples, load_detection_dataset
from .evaluation import coco_ground_truth, evaluate, format_metrics
from .model_card import write_model_card
from .transforms import DetrAugmentation

logger = logging.getLogger("deformable_detr.train")

# --config_name presets; "paper" is the paper's Deformable DETR (ResNet-50, 6+6 layers, 300 queries)
CONFIG_PRESETS = {
    "paper": {},
    "tiny": dict(
        backbone="resnet18",
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        encoder_ffn_dim=512,
        decoder_ffn_dim=512,
        num_queries=100,
        two_stage_num_proposals=100,
        num_feature_levels=3,
    ),
}
SAMPLING_PARAMETERS = ("sampling_offsets", "reference_points")  # trained at --sampling_lr_factor x the lr
TRACKING_DIR = "deformable-detr"  # TensorBoard runs, under --output_dir


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the description's lines and shows every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable-detr-train", description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="a Hub dataset id (cppe-5 schema), a save_to_disk folder, a COCO folder (Roboflow's "
        "{split}/_annotations.coco.json or annotations/instances_{split}.json) or a Pascal VOC folder",
    )
    data.add_argument(
        "--validation_fraction",
        type=float,
        default=0.15,
        help="share of the training images held out when the data has no validation split",
    )
    data.add_argument(
        "--image_size",
        type=int,
        default=800,
        help="shortest image side for evaluation; training scales 0.6x..1x of it (DETR: 480..800)",
    )
    data.add_argument("--max_image_size", type=int, default=1333, help="longest image side")
    data.add_argument("--no_augmentation", action="store_true", help="train on plain resized images")
    data.add_argument("--num_workers", type=int, default=2, help="data loading processes per device")

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        help="a saved model folder or Hub id: ours, or transformers' "
        "Deformable DETR (converted on the fly). A new label set gets fresh class heads.",
    )
    model.add_argument("--config_name", help=f"a fresh model: a config.json, or a preset: {', '.join(CONFIG_PRESETS)}")
    model.add_argument("--config_overrides", default="", help='with --config_name, e.g. "d_model=64,encoder_layers=1"')
    model.add_argument(
        "--backbone_weights",
        help="with --config_name: ResNet weights for the built-in backbone "
        "(a .safetensors/.pth file with torchvision names, or a Hub id)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning_rate", type=float, default=2e-4, help="AdamW lr of the transformer and heads")
    optim.add_argument("--backbone_learning_rate", type=float, default=2e-5, help="AdamW lr of the backbone")
    optim.add_argument(
        "--sampling_lr_factor",
        type=float,
        default=0.1,
        help="lr multiplier of the sampling offsets and reference points",
    )
    optim.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay, for every parameter")
    optim.add_argument("--max_grad_norm", type=float, default=0.1, help="gradient norm clip (0: none)")
    optim.add_argument(
        "--lr_drop",
        type=float,
        default=0.8,
        help="share of the steps after which the lr is x0.1 (paper: 40 of 50 epochs)",
    )
    optim.add_argument("--per_device_train_batch_size", type=int, default=2, help="images per step and process")
    optim.add_argument(
        "--per_device_eval_batch_size", type=int, default=2, help="images per evaluation batch and process"
    )
    optim.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches summed into one optimiser step"
    )
    optim.add_argument("--num_train_epochs", type=int, default=50, help="passes over the training split (paper: 50)")
    optim.add_argument("--max_steps", type=int, default=None, help="optimiser steps; overrides --num_train_epochs")
    optim.add_argument(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="default: what `accelerate config` chose, else no",
    )
    optim.add_argument(
        "--seed", type=int, default=42, help="initialisation, data order, augmentation, validation split"
    )

    run = parser.add_argument_group("outputs and checkpoints")
    run.add_argument("--output_dir", default="outputs/deformable-detr", help="model, card, log, checkpoints")
    run.add_argument("--checkpointing_steps", default="epoch", help='"epoch", a number of steps, or "no"')
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="older checkpoints are deleted")
    run.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest" (in --output_dir)')
    run.add_argument(
        "--eval_every_epochs", type=int, default=1, help="COCO evaluation every N epochs (0: only at the end)"
    )
    run.add_argument("--logging_steps", type=int, default=10, help="steps between log lines (mean loss terms, lr)")
    run.add_argument("--with_tracking", action="store_true", help="log to TensorBoard in --output_dir/" + TRACKING_DIR)

    hub = parser.add_argument_group("the Hub")
    hub.add_argument(
        "--push_to_hub", action="store_true", help="upload the trained model, processor, code and card at the end"
    )
    hub.add_argument(
        "--hub_model_id", help="the repo to push to, e.g. user/deformable-detr-bccd (default: the name of --output_dir)"
    )
    hub.add_argument("--hub_token", help="a Hub token with write access (default: the one `hf auth login` stored)")
    hub.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    return parser


def check_args(args):
    """Raises ValueError naming the option when the options do not fit together."""
    if bool(args.model_name_or_path) == bool(args.config_name):
        raise ValueError(
            "give exactly one of --model_name_or_path (start from a saved model) and --config_name (a fresh one)"
        )
    if args.config_overrides and not args.config_name:
        raise ValueError("--config_overrides changes a fresh model's config; it needs --config_name")
    if args.backbone_weights and not args.config_name:
        raise ValueError("--backbone_weights is for a fresh model (--config_name); a saved model has its own")
    if (args.hub_model_id or args.hub_token or args.hub_private_repo) and not args.push_to_hub:
        raise ValueError("--hub_model_id, --hub_token and --hub_private_repo need --push_to_hub")
    for name in (
        "image_size",
        "max_image_size",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "logging_steps",
        "checkpoints_total_limit",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.with_tracking:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "--with_tracking logs to TensorBoard, which is not installed: pip install tensorboard"
            ) from None
    if args.checkpointing_steps not in ("epoch", "no") and not args.checkpointing_steps.isdigit():
        raise ValueError(
            f'--checkpointing_steps must be "epoch", "no" or a number of steps, got {args.checkpointing_steps!r}'
        )


def redact_token(argv: list[str]) -> list[str]:
    """The command line for the model card and the log, without the value of --hub_token."""
    redacted = []
    for arg in argv:
        hidden = redacted and redacted[-1] == "--hub_token"
        redacted.append("***" if hidden else "--hub_token=***" if arg.startswith("--hub_token=") else arg)
    return redacted


def build_config(name: str, overrides: str) -> DeformableDetrConfig:
    if name in CONFIG_PRESETS:
        config = DeformableDetrConfig(**CONFIG_PRESETS[name])
    elif os.path.isfile(name) or os.path.isdir(name):
        config = DeformableDetrConfig.from_pretrained(name)
    else:
        raise ValueError(
            f"--config_name {name!r} is neither a config file/folder nor a preset ({', '.join(CONFIG_PRESETS)})"
        )
    if overrides:
        try:
            config.update_from_string(overrides)
        except (ValueError, TypeError) as error:
            raise ValueError(f"--config_overrides {overrides!r}: {error}") from error
        config.validate()
    return config


def build_model(args, class_names: list[str]) -> DeformableDetrForObjectDetection:
    if args.model_name_or_path:
        from .convert_deformable_detr import load_model

        model = load_model(args.model_name_or_path)
    else:
        config = build_config(args.config_name, args.config_overrides)
        if not args.backbone_weights and "freeze_backbone_batch_norms" not in args.config_overrides:
            config.freeze_backbone_batch_norms = False  # a random backbone must learn, batch norms included
        config.id2label = dict(enumerate(class_names))
        config.label2id = {name: i for i, name in enumerate(class_names)}
        model = DeformableDetrForObjectDetection(config)
        if args.backbone_weights:
            model.model.load_backbone_weights(args.backbone_weights)
    model.set_labels(class_names)
    return model


def parameter_groups(model, args) -> list[dict]:
    """The paper's three learning rates: backbone, sampling offsets and reference points, everything else."""
    groups = {"backbone": [], "sampling": [], "rest": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if ".backbone." in f".{name}":
            groups["backbone"].append(parameter)
        elif any(key in name for key in SAMPLING_PARAMETERS):
            groups["sampling"].append(parameter)
        else:
            groups["rest"].append(parameter)
    lrs = {
        "backbone": args.backbone_learning_rate,
        "sampling": args.learning_rate * args.sampling_lr_factor,
        "rest": args.learning_rate,
    }
    return [{"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params]


class StopRequest:
    """SIGTERM and the first Ctrl-C ask the loop to checkpoint and stop at the end of the step; a second Ctrl-C
    stops at once."""

    signum = signal.SIGTERM  # the last signal received (SIGTERM when another process received it)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, StopRequest.signum = True, signum
        logger.warning("received %s: writing a checkpoint after this step, then stopping", signal.Signals(signum).name)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class TrainingStopped(Exception):
    """Raised by `train` after a signal asked it to stop: the checkpoint it wrote is `checkpoint`."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(f"stopped by {signal.Signals(signum).name}; continue with --resume_from_checkpoint latest")
        self.signum, self.checkpoint = signum, checkpoint


def main(argv=None):
    """The command: exceptions become a message and an exit status (a signal's: 128 + its number)."""
    try:
        train(argv)
    except TrainingStopped as stopped:
        raise SystemExit(128 + stopped.signum) from None
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"deformable-detr-train: error: {error}") from None


@dataclass
class Run:
    """The prepared pieces of one run, and the loss terms and bad-window flag carried between its steps."""

    args: argparse.Namespace
    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    train_samples: DetectionSamples
    train_loader: Any
    max_steps: int
    running: list[dict] = field(default_factory=list)  # loss terms since the last log line
    window_bad: bool = False  # the accumulation window saw a non-finite loss


def train(argv=None) -> dict | None:
    """Runs the command with `argv` (default: sys.argv); returns the final validation metrics. Bad options or
    data raise ValueError / FileNotFoundError naming them; a signal raises TrainingStopped after a checkpoint."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env, set_seed

    args = build_parser().parse_args(argv)
    check_args(args)
    command = shlex.join(redact_token([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))))
    os.makedirs(args.output_dir, exist_ok=True)
    # the processes, known before the Accelerator (which needs the model's config) exists; as it, honour
    # ACCELERATE_USE_CPU, which makes several CPU processes one gloo group
    setup_logging(PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")), args.output_dir)
    set_seed(args.seed)

    splits, class_names = load_detection_dataset(args.dataset, args.validation_fraction, args.seed)
    logger.info(
        "data %s: %d training and %d validation images, classes %s",
        args.dataset,
        len(splits["train"]),
        len(splits["validation"]),
        class_names,
    )
    processor = DeformableDetrImageProcessor(
        size={"shortest_edge": args.image_size, "longest_edge": args.max_image_size}
    )
    run, eval_loader = prepare(args, splits, class_names, processor)
    accelerator = run.accelerator
    ground_truth = coco_ground_truth(splits["validation"], class_names)
    state = resume_or_start(run)
    steps_per_epoch = math.ceil(len(run.train_loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(run.max_steps / steps_per_epoch)
    logger.info(
        "training %d steps (%d epochs of %d), %d images per step, on %d process(es), mixed precision %s",
        run.max_steps,
        num_epochs,
        steps_per_epoch,
        args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes,
        accelerator.num_processes,
        accelerator.mixed_precision,
    )
    stop = StopRequest()
    progress = tqdm(
        total=run.max_steps,
        initial=state.global_step,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    metrics = None
    started = time.time()
    try:
        for epoch in range(state.epoch, num_epochs):
            if state.global_step >= run.max_steps:  # resumed from the last step
                break
            stopping = run_epoch(run, state, epoch, stop, progress)
            finished = state.global_step >= run.max_steps
            if stopping and not finished:
                checkpoint = save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
                logger.warning("stopped at step %d; continue with --resume_from_checkpoint latest", state.global_step)
                accelerator.end_training()
                raise TrainingStopped(StopRequest.signum, checkpoint)
            if finished or (args.eval_every_epochs and (epoch + 1) % args.eval_every_epochs == 0):
                metrics = evaluate(run.model, processor, eval_loader, accelerator, ground_truth)
                state.history.append({"step": state.global_step, "epoch": epoch + 1, "eval": metrics})
                accelerator.log(
                    {f"eval/{k}": v for k, v in metrics.items() if k != "per_class"}, step=state.global_step
                )
                logger.info("epoch %d, step %d, validation:\n%s", epoch + 1, state.global_step, format_metrics(metrics))
            if finished:
                break
            if args.checkpointing_steps == "epoch":
                save_checkpoint(accelerator, args.output_dir, state, args.checkpoints_total_limit)
    finally:
        stop.restore()
        progress.close()
    minutes = (time.time() - started) / 60
    finish(accelerator, run.model, processor, args, state, metrics, command, minutes)
    accelerator.end_training()
    return metrics


def prepare(args, splits, class_names: list[str], processor) -> tuple[Run, Any]:
    """The model, optimiser, lr schedule and loaders, prepared by an Accelerator; -> (run, validation loader)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    model = build_model(args, class_names)
    # with box refinement but no auxiliary loss, the earlier layers' class heads get no gradient
    unused = model.config.with_box_refine and not model.config.auxiliary_loss
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="tensorboard" if args.with_tracking else None,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)],
    )
    train_samples, train_loader, eval_loader = make_loaders(args, splits, processor)
    optimizer = torch.optim.AdamW(parameter_groups(model, args), weight_decay=args.weight_decay)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    max_steps = args.max_steps or args.num_train_epochs * steps_per_epoch
    drop_step = int(args.lr_drop * max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.1 if step >= drop_step else 1.0)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us once per optimiser step
    run = Run(args, accelerator, model, optimizer, scheduler, train_samples, train_loader, max_steps)
    return run, eval_loader


def resume_or_start(run: Run) -> TrainState:
    """The state of --resume_from_checkpoint, or a fresh one where --output_dir holds no earlier run's
    checkpoints; opens the TensorBoard run."""
    args = run.args
    checkpoint = find_checkpoint(args.resume_from_checkpoint, args.output_dir) if args.resume_from_checkpoint else None
    if checkpoint:
        state = load_checkpoint(run.accelerator, checkpoint)
    elif list_checkpoints(args.output_dir):
        raise ValueError(
            f"{args.output_dir} holds checkpoints of an earlier run: continue it with --resume_from_checkpoint "
            "latest, or start afresh in another --output_dir"
        )
    else:
        state = TrainState()
    if args.with_tracking:
        options = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
        run.accelerator.init_trackers(TRACKING_DIR, options)
    return state


def run_epoch(run: Run, state: TrainState, epoch: int, stop: StopRequest, progress) -> bool:
    """One pass over the training batches (the rest of it, when resumed mid-epoch), ending early at the last
    step or when a signal asked to stop (on every process together); -> whether one did."""
    accelerator, model = run.accelerator, run.model
    state.epoch = epoch
    model.train()
    run.train_samples.set_epoch(epoch)
    run.train_loader.set_epoch(epoch)
    batches = run.train_loader
    if state.batches_in_epoch:
        batches = accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    for batch in batches:
        with accelerator.accumulate(model):
            outputs, finite, run.window_bad, stopping = forward_backward(
                model, batch, accelerator, run.window_bad, stop.requested
            )
            if accelerator.sync_gradients:
                optimiser_step(
                    model, run.optimizer, run.scheduler, accelerator, run.args, state, run.window_bad, outputs.loss
                )
        state.batches_in_epoch += 1
        if finite:
            run.running.append({"loss": outputs.loss.item()} | main_terms(outputs.loss_dict))
        if not accelerator.sync_gradients:
            continue
        run.window_bad = False
        state.global_step += 1
        after_step(run, state, epoch, progress)
        if stopping or state.global_step >= run.max_steps:
            return stopping
    state.epoch, state.batches_in_epoch = epoch + 1, 0
    return False


def after_step(run: Run, state: TrainState, epoch: int, progress):
    """The progress bar, a log line every --logging_steps, a checkpoint every --checkpointing_steps."""
    args = run.args
    progress.update(1)
    lr = run.scheduler.get_last_lr()[-1]
    if run.running:
        progress.set_postfix(loss=f"{run.running[-1]['loss']:.3f}", lr=f"{lr:.1e}")
    if state.global_step % args.logging_steps == 0 or state.global_step == run.max_steps:
        log_training(run.accelerator, state, run.running, lr, epoch)
        run.running = []
    every = int(args.checkpointing_steps) if args.checkpointing_steps.isdigit() else 0
    if every and state.global_step % every == 0 and state.global_step < run.max_steps:
        save_checkpoint(run.accelerator, args.output_dir, state, args.checkpoints_total_limit)


def setup_logging(state, output_dir: str):
    """INFO to the console and --output_dir/train.log from the main process; warnings from every process."""
    handlers = [logging.StreamHandler()]
    if state.is_main_process:
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    for handler in handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    package = logging.getLogger("deformable_detr")  # this module's logger and data.py's report through it
    package.handlers = handlers
    package.setLevel(logging.INFO if state.is_main_process else logging.WARNING)
    package.propagate = False


def make_loaders(args, splits, processor):
    """(training samples, whose epoch sets the augmentation; training loader; validation loader)."""
    augmentation = None if args.no_augmentation else DetrAugmentation(args.image_size, args.max_image_size)
    train_samples = DetectionSamples(splits["train"], augmentation, args.seed)
    # augmented images come resized already; the processor normalises and pads them
    train_processor = DeformableDetrImageProcessor(**{**processor.to_dict(), "do_resize": augmentation is None})
    train_loader = torch.utils.data.DataLoader(
        train_samples,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=DetectionCollator(train_processor),
        num_workers=args.num_workers,
        # its own generator: making a loader's iterator then leaves the global random state (dropout) alone
        generator=torch.Generator().manual_seed(args.seed),
        worker_init_fn=ignore_interrupts,
    )
    eval_loader = torch.utils.data.DataLoader(
        DetectionSamples(splits["validation"]),
        batch_size=args.per_device_eval_batch_size,
        collate_fn=DetectionCollator(processor),
        num_workers=args.num_workers,
        worker_init_fn=ignore_interrupts,
    )
    return train_samples, train_loader, eval_loader


def forward_backward(model, batch, accelerator, window_bad: bool, stop_requested: bool):
    """The loss of one batch, and its backward pass unless the accumulation window already saw a non-finite
    loss. Non-finite losses and stop requests are summed over processes, so that all of them skip or stop
    together. Returns (outputs, finite on every process, window_bad, stopping)."""
    outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
    flags = torch.tensor([float(not torch.isfinite(outputs.loss)), float(stop_requested)], device=accelerator.device)
    flags = accelerator.reduce(flags, "sum")
    finite = not flags[0]
    window_bad = window_bad or not finite
    if not window_bad:
        accelerator.backward(outputs.loss)
    return outputs, finite, window_bad, bool(flags[1])


def optimiser_step(model, optimizer, scheduler, accelerator, args, state: TrainState, window_bad: bool, loss):
    """At the end of an accumulation window: clip and apply the gradients, or skip (and count) the step when the
    window saw a non-finite loss or the gradients are not finite (in fp16 the grad scaler skips such steps itself
    and lowers its scale). The lr schedule advances either way."""
    if not window_bad:
        norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
        if accelerator.mixed_precision != "fp16" and not torch.isfinite(norm):
            window_bad, loss = True, norm
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
    scheduler.step()


def main_terms(loss_dict: dict) -> dict:
    """The last layer's loss terms (loss_ce, loss_bbox, loss_giou) and cardinality_error, without the auxiliary
    and encoder ones."""
    return {k: v.item() for k, v in loss_dict.items() if k.count("_") == 1}


def ignore_interrupts(worker_id: int):
    """Data loading workers leave Ctrl-C to the main process, which checkpoints before stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def log_training(accelerator, state: TrainState, running: list[dict], lr: float, epoch: int):
    """Logs the loss terms averaged over the steps since the last log and over the processes (every process
    holds as many, since they skip steps together)."""
    if not running:
        return
    local = torch.tensor([[r[k] for k in running[0]] for r in running], device=accelerator.device).mean(0)
    means = dict(zip(running[0], accelerator.reduce(local, "mean").tolist()))
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


def finish(accelerator, model, processor, args, state, metrics, command, minutes):
    """The trained model, processor, history, metrics and model card in --output_dir."""
    accelerator.wait_for_everyone()
    weights = accelerator.get_state_dict(model)  # every process takes part: FSDP and DeepSpeed gather shards
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    model.save_pretrained(args.output_dir, state_dict=weights)
    processor.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "history.json"), "w") as f:
        json.dump(state.history, f, indent=1)
    if metrics is not None:
        with open(os.path.join(args.output_dir, "eval_results.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    write_model_card(
        args.output_dir,
        model.config,
        metrics,
        dataset=args.dataset,
        command=command,
        steps=state.global_step,
        skipped_steps=state.skipped_steps,
        minutes=minutes,
        processes=accelerator.num_processes,
    )
    logger.info("model, processor and model card saved to %s", args.output_dir)
    if args.push_to_hub:
        push_to_hub(args)


def push_to_hub(args) -> str:
    """Uploads --output_dir without its checkpoints and TensorBoard runs; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    repo_id = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="Training run",
        ignore_patterns=["checkpoint-*", f"{TRACKING_DIR}/*", "train.log"],
    )
    logger.info("pushed to %s (%s)", repo_id, commit.commit_url)
    return commit.commit_url


if __name__ == "__main__":
    main()
