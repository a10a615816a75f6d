"""The options of a training run: `TrainingOptions`, one typed object that `train` takes and checks as a whole.
The `deformable-detr-train` command makes its flags from these fields (name, type, default, help, group), so the
two cannot drift apart.

The defaults are the paper's recipe: AdamW, lr 2e-4, backbone lr 2e-5, 0.1x lr for the sampling offsets and
reference points, weight decay 1e-4, gradient norm clipped at 0.1, lr x0.1 after 80% of the steps, and DETR's
augmentation.

Several devices or machines: run the command under `accelerate launch` (data parallel; FSDP or DeepSpeed from an
accelerate config). CPU processes need ACCELERATE_USE_CPU=1; there, an FSDP config makes the training loop shard
the model itself (torch's fully_shard), as accelerate shards on GPUs only.
"""

import math
import shlex
from dataclasses import MISSING, dataclass, field, fields

from ..metrics.metric_names import SUMMARY_NAMES
from .schedule import SCHEDULES
from .tracking import tracker_names

# config_name presets; "paper" is the paper's Deformable DETR (ResNet-50, 6+6 layers, 300 queries)
CONFIG_PRESETS = {
    "paper": {},
    "tiny": {
        "backbone": "resnet18",
        "d_model": 128,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_ffn_dim": 512,
        "decoder_ffn_dim": 512,
        "num_queries": 100,
        "two_stage_num_proposals": 100,
        "num_feature_levels": 3,
    },
}
# fine-tuning starts from the paper's COCO-trained model (transformers' format, converted on the fly) unless told
DEFAULT_MODEL = "SenseTime/deformable-detr"
TRACKING_DIR = "deformable-detr"  # TensorBoard runs, under output_dir
MIXED_PRECISION = ("no", "bf16", "fp16")


def option(default, group: str, help: str):
    """A field with its command-line group and help."""
    return field(default=default, metadata={"group": group, "help": help})


@dataclass
class TrainingOptions:
    dataset: str = field(
        metadata={
            "group": "data",
            "help": "a Hub dataset id (cppe-5 schema), a save_to_disk folder, a COCO folder (Roboflow's "
            "{split}/_annotations.coco.json or annotations/instances_{split}.json) or a Pascal VOC folder",
        }
    )
    validation_fraction: float = option(
        0.15, "data", "share of the training images held out when the data has no validation split"
    )
    image_size: int = option(
        800, "data", "shortest image side for evaluation; training scales 0.6x..1x of it (DETR: 480..800)"
    )
    max_image_size: int = option(1333, "data", "longest image side")
    no_augmentation: bool = option(False, "data", "train on plain resized images")
    multi_scale: str = option(
        "",
        "data",
        'the shortest sides training picks from, e.g. "480,512,544,576,608,640" (default: DETR\'s 480..800 in steps '
        "of 32, scaled by image_size/800)",
    )
    skip_bad_images: bool = option(
        False,
        "data",
        "leave out images that cannot be read (listed in one warning) instead of refusing the dataset; every "
        "image's header is checked when the data is loaded, and one that fails to decode later is skipped, named",
    )
    num_workers: int = option(2, "data", "data loading processes per device")

    model_name_or_path: str | None = option(
        None,
        "model",
        "a saved model folder or Hub id: ours, or transformers' Deformable DETR (converted on the fly). A new "
        f"label set gets fresh class heads. Default, unless config_name: {DEFAULT_MODEL}, the paper's COCO model",
    )
    config_name: str | None = option(
        None, "model", f"a fresh model: a config.json, or a preset: {', '.join(CONFIG_PRESETS)}"
    )
    config_overrides: str = option("", "model", 'with config_name, e.g. "d_model=64,encoder_layers=1"')
    backbone_weights: str | None = option(
        None,
        "model",
        "with config_name: ResNet weights for the built-in backbone (a .safetensors/.pth file with torchvision "
        "names, or a Hub id)",
    )

    freeze_backbone: bool = option(
        False, "model", "train only the transformer and the heads; the backbone's weights stay as they are"
    )

    learning_rate: float = option(2e-4, "optimisation", "AdamW lr of the transformer and heads")
    backbone_learning_rate: float = option(2e-5, "optimisation", "AdamW lr of the backbone")
    sampling_lr_factor: float = option(
        0.1, "optimisation", "lr multiplier of the sampling offsets and reference points"
    )
    weight_decay: float = option(1e-4, "optimisation", "AdamW weight decay, for every parameter")
    max_grad_norm: float = option(0.1, "optimisation", "gradient norm clip (0: none)")
    lr_scheduler: str = option(
        "step", "optimisation", '"step": x0.1 after lr_drop of the steps (the paper\'s); "cosine": down to 0 at the end'
    )
    lr_drop: float = option(
        0.8, "optimisation", "share of the steps after which the lr is x0.1 (paper: 40 of 50 epochs)"
    )
    warmup_steps: int = option(0, "optimisation", "steps over which the lr rises linearly to its value first")
    ema_decay: float = option(
        0.0,
        "optimisation",
        "keep an exponential moving average of the weights with this decay (e.g. 0.9997, as RF-DETR; 0: off, the "
        "paper's recipe); evaluation and the saved model use it",
    )
    ema_warmup_steps: int = option(
        2000, "optimisation", "the average's decay grows as decay * (1 - exp(-step / this)): early steps weigh little"
    )
    gradient_checkpointing: bool = option(
        False,
        "optimisation",
        "recompute the backbone stages' and the encoder and decoder layers' activations in the backward pass "
        "instead of keeping them: less memory, more time, the same gradients",
    )
    per_device_train_batch_size: int = option(2, "optimisation", "images per step and process")
    per_device_eval_batch_size: int = option(2, "optimisation", "images per evaluation batch and process")
    gradient_accumulation_steps: int = option(1, "optimisation", "batches summed into one optimiser step")
    num_train_epochs: int = option(50, "optimisation", "passes over the training split (paper: 50)")
    max_steps: int | None = option(None, "optimisation", "optimiser steps; overrides num_train_epochs")
    mixed_precision: str | None = option(
        None, "optimisation", f"one of {', '.join(MIXED_PRECISION)}; default: what `accelerate config` chose, else no"
    )
    device: str | None = option(
        None,
        "optimisation",
        "the torch device of a one-process run: cpu, cuda, cuda:N or mps (default: the GPU or other accelerator "
        "accelerate finds, else cpu); under `accelerate launch` the launcher places the processes",
    )
    seed: int = option(42, "optimisation", "initialisation, data order, augmentation, validation split")
    torch_compile: bool = option(
        False,
        "optimisation",
        "train the network (backbone and transformer) under torch.compile (inductor), the fused kernels custom ops in "
        "its one graph; the loss and its matching stay eager",
    )
    deterministic: bool = option(
        False,
        "optimisation",
        "bitwise-repeatable training (torch.use_deterministic_algorithms): the same weights run after run; the op's "
        "backward then sums in a fixed order on GPUs too (not yet timed on one)",
    )

    output_dir: str = option("outputs/deformable-detr", "outputs and checkpoints", "model, card, log, checkpoints")
    checkpointing_steps: str = option("epoch", "outputs and checkpoints", '"epoch", a number of steps, or "no"')
    checkpoints_total_limit: int = option(2, "outputs and checkpoints", "older checkpoints are deleted")
    resume_from_checkpoint: str | None = option(
        None, "outputs and checkpoints", 'a checkpoint folder, or "latest" (in output_dir)'
    )
    eval_every_epochs: int = option(1, "outputs and checkpoints", "COCO evaluation every N epochs (0: only at the end)")
    metric_for_best_model: str = option(
        "map",
        "outputs and checkpoints",
        "the validation metric (higher is better) whose best value's model is kept in output_dir/best/, never "
        "deleted by checkpoints_total_limit",
    )
    load_best_model_at_end: bool = option(
        False, "outputs and checkpoints", "the saved model is the best one (output_dir/best/), not the last"
    )
    early_stopping_patience: int = option(
        0,
        "outputs and checkpoints",
        "stop after this many evaluations without a better metric_for_best_model (0: never)",
    )
    logging_steps: int = option(10, "outputs and checkpoints", "steps between log lines (mean loss terms, lr)")
    report_to: str = option(
        "none",
        "outputs and checkpoints",
        "experiment trackers, through accelerate: none, all, or some of tensorboard, wandb, mlflow, comet_ml "
        f"(separated by commas); TensorBoard writes into output_dir/{TRACKING_DIR}. Logged: the loss terms, lr, "
        "gradient norm, validation metrics and a picture of detections on validation images per evaluation",
    )
    with_tracking: bool = option(False, "outputs and checkpoints", "the same as report_to tensorboard")

    push_to_hub: bool = option(False, "the Hub", "upload the trained model, processor, code and card at the end")
    hub_model_id: str | None = option(
        None, "the Hub", "the repo to push to, e.g. user/deformable-detr-bccd (default: the name of output_dir)"
    )
    hub_token: str | None = option(
        None, "the Hub", "a Hub token with write access (default: the one `hf auth login` stored)"
    )
    hub_private_repo: bool = option(False, "the Hub", "create the repo private")

    def __post_init__(self):
        self.checkpointing_steps = str(self.checkpointing_steps)
        self.check()

    def check(self):
        """Raises ValueError naming the option where the options do not fit together."""
        if self.model_name_or_path and self.config_name:
            raise ValueError(
                "give one of model_name_or_path (start from a saved model) and config_name (a fresh one), not both"
            )
        if not self.config_name:
            self.model_name_or_path = self.model_name_or_path or DEFAULT_MODEL
        if self.config_overrides and not self.config_name:
            raise ValueError("config_overrides changes a fresh model's config; it needs config_name")
        if self.backbone_weights and not self.config_name:
            raise ValueError("backbone_weights is for a fresh model (config_name); a saved model has its own")
        if (self.hub_model_id or self.hub_token or self.hub_private_repo) and not self.push_to_hub:
            raise ValueError("hub_model_id, hub_token and hub_private_repo need push_to_hub")
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
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_image_size < self.image_size:
            raise ValueError(f"max_image_size ({self.max_image_size}) must be at least image_size ({self.image_size})")
        for name in (
            "learning_rate",
            "backbone_learning_rate",
            "sampling_lr_factor",
            "weight_decay",
            "max_grad_norm",
            "eval_every_epochs",
            "num_workers",
        ):
            if not 0 <= getattr(self, name) < math.inf:  # NaN included
                raise ValueError(f"{name} must be a finite number, at least 0, got {getattr(self, name)}")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"lr_drop must be a share of the steps, in (0, 1], got {self.lr_drop}")
        self.training_scales()  # raises naming a bad multi_scale
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULES}, got {self.lr_scheduler!r}")
        if self.metric_for_best_model not in SUMMARY_NAMES:
            raise ValueError(
                f"metric_for_best_model must be one of {SUMMARY_NAMES}, got {self.metric_for_best_model!r}"
            )
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be at least 0, got {self.early_stopping_patience}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_warmup_steps < 1:
            raise ValueError(f"ema_warmup_steps must be at least 1, got {self.ema_warmup_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if self.mixed_precision not in (None, *MIXED_PRECISION):
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.checkpointing_steps not in ("epoch", "no") and not (
            self.checkpointing_steps.isdigit() and int(self.checkpointing_steps) > 0
        ):
            raise ValueError(
                f'checkpointing_steps must be "epoch", "no" or a number of steps (at least 1), got '
                f"{self.checkpointing_steps!r}"
            )
        if self.device is not None:
            from ..utils.devices import checked_device

            checked_device(self.device)  # raises naming a device this torch cannot use here
        if self.with_tracking and self.report_to == "none":
            self.report_to = "tensorboard"
        tracker_names(self.report_to)  # raises naming an unknown tracker or a missing package

    def training_scales(self) -> list[int] | None:
        """multi_scale as a list of sides, or None for the default."""
        try:
            scales = [int(side) for side in self.multi_scale.split(",") if side.strip()]
        except ValueError:
            scales = [0]
        if any(side < 1 for side in scales):
            raise ValueError(f'multi_scale must be positive sides separated by commas, got "{self.multi_scale}"')
        return scales or None

    def checkpoint_every(self) -> int:
        """Steps between checkpoints when checkpointing_steps is a number, else 0."""
        return int(self.checkpointing_steps) if self.checkpointing_steps.isdigit() else 0

    def command(self) -> str:
        """The command line that runs these options (for the model card and the log), without the hub token."""
        words = ["deformable-detr-train"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.default is not MISSING and value == f.default:
                continue
            if isinstance(value, bool):
                words.append(f"--{f.name}")
            else:
                words += [f"--{f.name}", "***" if f.name == "hub_token" else str(value)]
        return shlex.join(words)
