"""Trackers (--report_to, engine/tracking.py): TensorBoard gets the loss terms, lr, gradient norm, validation
metrics and a picture of detections; unknown trackers and missing packages are named before the run starts."""

import glob

import pytest

from deformable_detr.engine import TrainingOptions, train
from tests.support.training import options


def test_tensorboard_gets_scalars_and_a_picture_of_detections(shapes_folder, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train(options(shapes_folder, tmp_path, max_steps=3, report_to="tensorboard"))
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)  # scalars, and hparams apart
    accumulators = [event_accumulator.EventAccumulator(f, size_guidance={"images": 0}).Reload() for f in files]
    accumulator = max(accumulators, key=lambda a: len(a.Tags()["scalars"]))
    scalars = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/lr", "train/grad_norm", "eval/map", "eval/map_50"} <= scalars
    (picture,) = accumulator.Images("eval/detections")
    assert picture.step == 3 and picture.height == 320 and picture.width > 320  # 4 images side by side


def test_trackers_are_checked_before_the_run(monkeypatch):
    with pytest.raises(ValueError, match="report_to: unknown tracker 'neptune'"):
        TrainingOptions(dataset="x", config_name="tiny", report_to="tensorboard,neptune")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ValueError, match="report_to wandb: the package wandb is not installed"):
        TrainingOptions(dataset="x", config_name="tiny", report_to="wandb")
    assert TrainingOptions(dataset="x", config_name="tiny", with_tracking=True).report_to == ["tensorboard"]
    with pytest.raises(ValueError, match="report_to: unknown tracker 'neptune'"):
        TrainingOptions(dataset="x", config_name="tiny", report_to=["tensorboard", "neptune"])
