"""Options of tiny training runs, for the tests that train (in one process, or in several)."""

import shlex

from deformable_detr.engine import TrainingOptions
from tests.support.models import TINY_OVERRIDES


def options(data, output_dir, overrides=TINY_OVERRIDES, **changes) -> TrainingOptions:
    """A tiny fresh model (or changes["model_name_or_path"]) on small images, logging every step."""
    fields = dict(
        dataset=data,
        output_dir=str(output_dir),
        image_size=64,
        max_image_size=96,
        num_workers=0,
        logging_steps=1,
        per_device_train_batch_size=2,
    )
    if "model_name_or_path" not in changes:
        fields.update(config_name="tiny", config_overrides=overrides)
    return TrainingOptions(**(fields | changes))


# for runs in several processes, frozen batch norms: trainable ones normalise over each process's own images, which
# differs by design
TINY = TINY_OVERRIDES + ",dropout=0.0,freeze_backbone_batch_norms=true"


def training_options(data, output_dir, batch_size, **changes) -> TrainingOptions:
    """Options of a run that gives the same weights in one process or in several: 4 steps, no augmentation, no
    checkpoints, frozen batch norms, `batch_size` images per process."""
    same_everywhere = dict(
        logging_steps=10,
        no_augmentation=True,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2,
        max_steps=4,
        learning_rate=1e-3,
        lr_drop=1.0,
        checkpointing_steps="no",
    )
    return options(data, output_dir, TINY, **(same_everywhere | changes))


def command_line(options: TrainingOptions) -> list[str]:
    """The command's arguments for these options (as the torchrun workers get them)."""
    return shlex.split(options.command())[1:]
