"""Everything a training run needs beyond the model: data in one schema (data.py loads it: the schema in schema.py, COCO
and Pascal VOC folders in coco.py and voc.py, one image's objects in objects.py) with its image checks
(image_files.py), the samples and batches trained on (samples.py), DETR's augmentation (transforms.py), COCO
evaluation (evaluation.py, metric_names.py), the options (options.py), the loop (loop.py) with the run's model
(model_setup.py), checkpoints (checkpoints.py), the upload to the Hub (hub.py), the weight average (ema.py), lr
schedules (schedule.py), trackers (tracking.py), the check of a multi-process launch (launch.py), sharding on CPU
processes (sharding.py), stopping on signals (signals.py), the model card (model_card.py) and synthetic data
(shapes.py). None of it is saved with a model; it may use the training dependencies (datasets, accelerate,
pycocotools, scipy).

    from deformable_detr.training import TrainingOptions, train
    metrics = train(TrainingOptions(dataset="cppe-5", model_name_or_path="SenseTime/deformable-detr"))
"""

from .options import TrainingOptions
from .signals import TrainingStopped

__all__ = ["TrainingOptions", "TrainingStopped", "train"]


def __getattr__(name: str):
    """train, imported on first use: the options alone (the commands' flags) need no datasets or accelerate."""
    if name == "train":
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
