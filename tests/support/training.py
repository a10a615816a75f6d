"""Options of tiny training runs, for the tests that train."""

from deformable_detr.training import TrainingOptions
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
