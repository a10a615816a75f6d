"""The options of a training run: `TrainingOptions`, one typed object that `train` takes and checks as a whole.
The `deformable-detr-train` command makes its flags from these fields (name, type, default, help, group), so the
two cannot drift apart; each field's type says what values it takes, and `option_from_text` reads the command-line
text of every type.

The defaults are the paper's recipe: AdamW, lr 2e-4, backbone lr 2e-5, 0.1x lr for the sampling offsets and
reference points, weight decay 1e-4, gradient norm clipped at 0.1, lr x0.1 after 80% of the steps, and DETR's
augmentation.

Several devices or machines: run the command under `accelerate launch` (data parallel; FSDP or DeepSpeed from an
accelerate config). CPU processes need ACCELERATE_USE_CPU=1; there, an FSDP config makes the training loop shard
the model itself (torch's fully_shard), as accelerate shards on GPUs only.
"""

import math
import shlex
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Literal

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

Schedule = Literal[SCHEDULES]
Precision = Literal[MIXED_PRECISION]
Metric = Literal[tuple(SUMMARY_NAMES)]
# --training_recipe: what each recipe gives the options a run leaves at their defaults; a callable takes the
# model's config (H-DETR's hybrid queries are five times the one-to-one ones: 1,500 beside 300)
TRAINING_RECIPES = {
    "paper": {},
    "fast": {"hybrid_queries": lambda config: 5 * config.num_queries, "classification_loss": "iou_aware"},
}
OverrideValue = bool | int | float | str  # a config attribute's value; transformers converts it to the attribute's type


def option(default, group: str, help: str):
    """A field with its command-line group and help."""
    return field(default=default, metadata={"group": group, "help": help})


@dataclass
class TrainingOptions:
    """A training run's options. Each field's annotation is the type its value must have, checked when the options
    are made (TypeError naming the option), as are ranges and options that need each other (ValueError). An option
    that takes a list, a dict, or a number or words also takes its command-line text (`multi_scale="480,512"`,
    `config_overrides="d_model=64"`, `checkpointing_steps="500"`), read as the command reads it and kept typed."""

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
    multi_scale: list[int] | None = option(
        None,
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
    config_overrides: dict[str, OverrideValue] | None = option(
        None, "model", 'with config_name, e.g. "d_model=64,encoder_layers=1"'
    )
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
    lr_scheduler: Schedule = option(
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
    mixed_precision: Precision | None = option(
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

    training_recipe: Literal[tuple(TRAINING_RECIPES)] = option(
        "paper",
        "training-only queries and loss",
        '"paper" (the paper\'s: none of the options below) or "fast": hybrid matching with 5 times the model\'s '
        "queries (k = 6) and the IoU-aware loss, the combination that reached a given mAP in the fewest steps in "
        "scripts/convergence.py (docs/training.md); it sets only the options a run leaves at their defaults",
    )
    hybrid_queries: int = option(
        0,
        "training-only queries and loss",
        "H-DETR's hybrid matching: this many extra queries (e.g. 1500), trained one-to-many against the ground truth "
        "repeated hybrid_repeats times, kept apart from the model's queries by the decoder's attention mask and "
        "dropped after training (0: off, the paper's recipe; in two-stage the next top-scoring proposals)",
    )
    hybrid_repeats: int = option(6, "training-only queries and loss", "with hybrid_queries: k, the repeats of each box")
    hybrid_loss_weight: float = option(
        1.0, "training-only queries and loss", "with hybrid_queries: the weight of the one-to-many loss"
    )
    query_groups: int = option(
        1,
        "training-only queries and loss",
        "Group DETR: this many groups of queries (the model's own the first), each matched one-to-one on its own "
        "and kept apart by the attention mask; only the first is saved (1: off; in two-stage the next top-scoring "
        "proposals)",
    )
    one_to_many_heads: bool = option(
        False,
        "training-only queries and loss",
        "MS-DETR's mixed supervision: class and box heads of their own on the model's queries at every decoder "
        "layer, trained one-to-many against the ground truth repeated one_to_many_repeats times, beside the "
        "model's one-to-one heads; dropped after training",
    )
    one_to_many_repeats: int = option(
        6, "training-only queries and loss", "with one_to_many_heads: k, the repeats of each box"
    )
    one_to_many_loss_weight: float = option(
        1.0, "training-only queries and loss", "with one_to_many_heads: the weight of the heads' loss"
    )
    classification_loss: Literal["focal", "iou_aware"] = option(
        "focal",
        "training-only queries and loss",
        '"focal" (the paper\'s) or "iou_aware": a matched query\'s class target is p^alpha * IoU^(1-alpha) '
        "(RF-DETR's IA-BCE), unmatched ones focal negatives",
    )

    output_dir: str = option("outputs/deformable-detr", "outputs and checkpoints", "model, card, log, checkpoints")
    checkpointing_steps: Literal["epoch", "no"] | int = option(
        "epoch", "outputs and checkpoints", '"epoch", a number of steps, or "no"'
    )
    checkpoints_total_limit: int = option(2, "outputs and checkpoints", "older checkpoints are deleted")
    resume_from_checkpoint: str | None = option(
        None, "outputs and checkpoints", 'a checkpoint folder, or "latest" (in output_dir)'
    )
    eval_every_epochs: int = option(1, "outputs and checkpoints", "COCO evaluation every N epochs (0: only at the end)")
    metric_for_best_model: Metric = option(
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
    report_to: Literal["none", "all"] | list[str] = option(
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
        for f in fields(self):
            if isinstance(getattr(self, f.name), str) and has_text_syntax(f.type):
                setattr(self, f.name, option_from_text(f.name, getattr(self, f.name)))
        self.check_types()
        if self.model_name_or_path and self.config_name:
            raise ValueError(
                "give one of model_name_or_path (start from a saved model) and config_name (a fresh one), not both"
            )
        if not self.config_name:
            self.model_name_or_path = self.model_name_or_path or DEFAULT_MODEL
        if self.with_tracking and self.report_to == "none":
            self.report_to = ["tensorboard"]
        self.check()

    def with_recipe(self, config) -> "TrainingOptions":
        """These options with training_recipe's values for those at their defaults, for a model of `config`."""
        defaults = {f.name: f.default for f in fields(self)}
        chosen = {
            name: value(config) if callable(value) else value
            for name, value in TRAINING_RECIPES[self.training_recipe].items()
            if getattr(self, name) == defaults[name]
        }
        return replace(self, **chosen)

    def check_types(self):
        """Raises TypeError naming the option whose value is not of its field's type (ValueError where it is a word
        of the right kind but not one the option takes)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if not matches(value, f.type):
                words = {type(word) for word in literal_values(f.type)}
                error = ValueError if type(value) in words else TypeError
                raise error(f"{f.name} must be {describe(f.type)}, got {value!r} ({type(value).__name__})")

    def check(self):
        """Raises ValueError naming the option where the options do not fit together or a value is out of range."""
        if self.config_overrides and not self.config_name:
            raise ValueError("config_overrides changes a fresh model's config; it needs config_name")
        if self.backbone_weights and not self.config_name:
            raise ValueError("backbone_weights is for a fresh model (config_name); a saved model has its own")
        if (self.hub_model_id or self.hub_token or self.hub_private_repo) and not self.push_to_hub:
            raise ValueError("hub_model_id, hub_token and hub_private_repo need push_to_hub")
        if (self.hybrid_repeats != 6 or self.hybrid_loss_weight != 1.0) and not self.hybrid_queries:
            raise ValueError("hybrid_repeats and hybrid_loss_weight set the hybrid matching; they need hybrid_queries")
        if (self.one_to_many_repeats != 6 or self.one_to_many_loss_weight != 1.0) and not self.one_to_many_heads:
            raise ValueError(
                "one_to_many_repeats and one_to_many_loss_weight set the one-to-many heads; they need one_to_many_heads"
            )
        self.check_ranges()
        if self.device is not None:
            from ..utils.devices import checked_device

            checked_device(self.device)  # raises naming a device this torch cannot use here
        tracker_names(self.report_to)  # raises naming an unknown tracker or a missing package

    def check_ranges(self):
        """Raises ValueError naming the option whose number is out of its range."""
        for name in AT_LEAST_ONE:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if self.max_image_size < self.image_size:
            raise ValueError(f"max_image_size ({self.max_image_size}) must be at least image_size ({self.image_size})")
        for name in FINITE_AT_LEAST_ZERO:
            if not 0 <= getattr(self, name) < math.inf:  # NaN included
                raise ValueError(f"{name} must be a finite number, at least 0, got {getattr(self, name)}")
        if not 0 < self.lr_drop <= 1:
            raise ValueError(f"lr_drop must be a share of the steps, in (0, 1], got {self.lr_drop}")
        if any(side < 1 for side in self.multi_scale or []):
            raise ValueError(f'multi_scale must be {SYNTAX["multi_scale"]}, got "{option_text(self.multi_scale)}"')
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be at least 0, got {self.early_stopping_patience}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_warmup_steps < 1:
            raise ValueError(f"ema_warmup_steps must be at least 1, got {self.ema_warmup_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if isinstance(self.checkpointing_steps, int) and self.checkpointing_steps < 1:
            raise ValueError(
                f"checkpointing_steps must be {SYNTAX['checkpointing_steps']}, got {self.checkpointing_steps!r}"
            )

    def training_scales(self) -> list[int] | None:
        """The shortest sides training picks from, or None for DETR's (scaled by image_size/800)."""
        return self.multi_scale or None

    def checkpoint_every(self) -> int:
        """Steps between checkpoints when checkpointing_steps is a number, else 0."""
        return self.checkpointing_steps if isinstance(self.checkpointing_steps, int) else 0

    def hyperparameters(self) -> dict[str, bool | int | float | str]:
        """The options a tracker logs: the set ones, lists and dicts as their command-line text, no hub token."""
        return {
            f.name: option_text(value) if isinstance(value, (list, dict)) else value
            for f in fields(self)
            if (value := getattr(self, f.name)) is not None and f.name != "hub_token"
        }

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
                words += [f"--{f.name}", "***" if f.name == "hub_token" else option_text(value)]
        return shlex.join(words)


AT_LEAST_ONE = (
    "image_size",
    "max_image_size",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "logging_steps",
    "checkpoints_total_limit",
    "hybrid_repeats",
    "one_to_many_repeats",
    "query_groups",
)
FINITE_AT_LEAST_ZERO = (
    "learning_rate",
    "backbone_learning_rate",
    "sampling_lr_factor",
    "weight_decay",
    "max_grad_norm",
    "eval_every_epochs",
    "num_workers",
    "hybrid_queries",
    "hybrid_loss_weight",
    "one_to_many_loss_weight",
)
# what the command-line text of an option must be, where its type's words say less
SYNTAX = {
    "checkpointing_steps": '"epoch", "no" or a number of steps (at least 1)',
    "multi_scale": "positive sides separated by commas",
    "config_overrides": "key=value pairs separated by commas",
}
UNIONS = (typing.Union, types.UnionType)
NoneType = type(None)
WORDS = {bool: "True or False", int: "an int", float: "a number", str: "a str", NoneType: "None"}


def literal_values(annotation) -> tuple:
    """The words a type takes: a Literal's values, also those of the Literals in a union."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in UNIONS:
        return tuple(word for member in typing.get_args(annotation) for word in literal_values(member))
    return ()


def matches(value, annotation) -> bool:
    """Whether `value` is of the field type `annotation` (an int is a float's; a bool is no int's)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(type(value) is type(word) and value == word for word in args)
    if origin in UNIONS:
        return any(matches(value, member) for member in args)
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if annotation in (int, float):
        return isinstance(value, (int, annotation)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def describe(annotation) -> str:
    """A field type in words, for the messages: 'one of ('step', 'cosine')', '"epoch", "no" or an int'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return f"one of {args}"
    if origin in UNIONS:
        members = [member for member in args if member is not NoneType]
        words = [
            ", ".join(f'"{word}"' for word in literal_values(member))
            if len(members) > 1 and typing.get_origin(member) is Literal
            else describe(member)
            for member in members
        ]
        return " or ".join(words + ["None"] * (NoneType in args))
    if origin is list:
        return f"a list of {type_name(args[0])}"
    if origin is dict:
        return f"a dict of {type_name(args[0])} to {type_name(args[1])}"
    return WORDS.get(annotation, type_name(annotation))


def type_name(annotation) -> str:
    """A type's name, a union's as Python writes it (`bool | int | float | str`)."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def has_text_syntax(annotation) -> bool:
    """Whether a field of this type also takes its command-line text in Python: a list, a dict, or a number or
    words (`TrainingOptions(multi_scale="480,512")` as `--multi_scale 480,512`); a plain int, float or str field
    takes only its type."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in UNIONS else (annotation,)
    origins = {typing.get_origin(member) for member in members}
    return bool(origins & {list, dict}) or (Literal in origins and int in members)


def option_from_text(name: str, text: str):
    """Option `name`'s value from its command-line text (the text of `option_text`): an int, float or str as
    written, a list of comma-separated items, a dict of comma-separated key=value pairs (values as
    `override_value` reads them), a word of the option's as it is; ValueError naming the option where the text is
    no value of its type."""
    annotation = OPTION_TYPES[name]
    try:
        return value_from_text(annotation, text)
    except ValueError:
        raise ValueError(f'{name} must be {SYNTAX.get(name) or describe(annotation)}, got "{text}"') from None


def value_from_text(annotation, text: str):
    """`option_from_text` for a value of type `annotation`; ValueError where `text` is none."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in UNIONS:
        if text in literal_values(annotation):
            return text
        others = [member for member in args if member is not NoneType and typing.get_origin(member) is not Literal]
        return value_from_text(others[0], text) if others else text
    if origin is Literal:
        return text  # a word the option does not take is named by check_types (or argparse's choices)
    if origin is list:
        return [value_from_text(args[0], item.strip()) for item in text.split(",") if item.strip()]
    if origin is dict:
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise ValueError(text)
        return {key.strip(): override_value(value.strip()) for key, value in pairs}
    return annotation(text)


def override_value(text: str) -> OverrideValue:
    """A config override's value from its text: true or false, an int, a float, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def option_text(value) -> str:
    """A value as the command line writes it (`option_from_text` reads it back): a list's items and a dict's
    key=value pairs separated by commas, true and false in lower case."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(option_text, value))
    if isinstance(value, dict):
        return ",".join(f"{key}={option_text(item)}" for key, item in value.items())
    return str(value)


OPTION_TYPES = {f.name: f.type for f in fields(TrainingOptions)}
