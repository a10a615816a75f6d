"""Training: the options, the trainer and what a run needs beside the model and the data (checkpoints, the weight
average, lr schedules, parallelism, trackers, the Hub upload, the model card, stopping on signals).

    from deformable_detr.engine import TrainingOptions, train
    metrics = train(TrainingOptions(dataset="cppe-5", model_name_or_path="SenseTime/deformable-detr"))
"""

from .options import TrainingOptions
from .signals import TrainingStopped

__all__ = ["TrainingOptions", "TrainingStopped", "train"]


def __getattr__(name: str):
    """train, imported on first use: the options alone (the commands' flags) need no datasets or accelerate."""
    if name == "train":
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
