"""training.png: the loss terms, learning rate and validation mAP of a run, drawn for every run."""

import json

from PIL import Image

from deformable_detr.engine import train
from deformable_detr.engine.curves import plot_training
from tests.support.training import options


def test_every_run_draws_its_curves_and_evaluation_pictures(shapes_folder, tmp_path):
    """Every training run writes training.png and the last evaluation's pictures, each put in place whole."""
    train(options(shapes_folder, tmp_path, max_steps=4, checkpointing_steps="no"))  # 3 steps an epoch: 2 evaluations
    history = json.load(open(tmp_path / "history.json"))
    assert [h["step"] for h in history if "eval" in h] == [3, 4]
    with Image.open(tmp_path / "training.png") as picture:
        assert picture.format == "PNG" and picture.size == (770, 880)
    for name in ("precision_recall.png", "confusion_matrix.png", "precision_recall.json", "confusion_matrix.json"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob(".*.tmp"))  # written whole, through a temporary file


def test_curves_of_a_history_without_evaluations(tmp_path):
    history = [{"step": s, "epoch": 1, "lr": 2e-4, "loss": 10.0 / s, "loss_ce": 0.0, "loss_bbox": 0.5} for s in (1, 2)]
    path = plot_training(history, str(tmp_path / "curves.png"))
    with Image.open(path) as picture:
        assert picture.size == (770, 880)
