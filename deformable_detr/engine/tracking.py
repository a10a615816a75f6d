"""Experiment trackers, as accelerate offers them (`--report_to`): which ones, checked before the run starts, and
the picture of detections logged with every evaluation."""

import importlib.util

import numpy as np
from PIL import Image

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}  # -> package
PICTURE_HEIGHT = 320


def tracker_names(report_to: str | list[str]) -> list[str] | str | None:
    """accelerate's `log_with` for a report_to value ("none", "all", or a list of trackers); raises ValueError
    naming an unknown tracker or one whose package is not installed."""
    if report_to == "none" or not report_to:
        return None
    if report_to == "all":
        return "all"
    for name in report_to:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; give none, all or some of {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"report_to {name}: the package {TRACKERS[name]} is not installed (pip install {name})")
    return list(report_to)


def detections_picture(model, processor, images: list[Image.Image], threshold: float = 0.3) -> np.ndarray:
    """The model's detections drawn on `images`, side by side at one height: (H, W, 3) uint8."""
    from ..metrics.predictions import detect
    from ..utils.drawing import draw_detections

    training = model.training
    model.eval()
    detections, _ = detect(model, processor, images, threshold=threshold, top_k=30)
    model.train(training)
    drawn = []
    for image, found in zip(images, detections):
        scale = PICTURE_HEIGHT / image.height
        picture = draw_detections(image, found)
        drawn.append(np.asarray(picture.resize((max(1, round(image.width * scale)), PICTURE_HEIGHT))))
    return np.concatenate(drawn, axis=1)


def log_picture(accelerator, name: str, picture: np.ndarray, step: int):
    """Logs `picture` with every tracker that takes images (TensorBoard as NHWC, the others as a list)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: picture[None]}, step=step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [picture]}, step=step)
