"""--training_recipe: "paper" changes nothing; "fast" fills in hybrid matching and the IoU-aware loss where a run
leaves them at their defaults, sized to the model's queries, and the run's model card says so."""

import json

import pytest

from deformable_detr.engine import TrainingOptions, train
from deformable_detr.engine.model_card import training_methods
from deformable_detr.engine.model_setup import build_config
from tests.support.training import options

CONFIG = build_config("tiny", {"num_queries": 12})


def test_the_paper_recipe_changes_nothing():
    plain = TrainingOptions(dataset="d", config_name="tiny")
    assert plain.training_recipe == "paper" and plain.with_recipe(CONFIG) == plain


def test_fast_fills_in_the_defaults_for_the_models_queries():
    fast = TrainingOptions(dataset="d", config_name="tiny", training_recipe="fast").with_recipe(CONFIG)
    assert (fast.hybrid_queries, fast.hybrid_repeats, fast.classification_loss) == (60, 6, "iou_aware")
    assert "--training_recipe fast" in fast.command()


def test_fast_keeps_what_a_run_sets():
    chosen = TrainingOptions(dataset="d", config_name="tiny", training_recipe="fast", hybrid_queries=7)
    assert chosen.with_recipe(CONFIG).hybrid_queries == 7


def test_an_unknown_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="training_recipe"):
        TrainingOptions(dataset="d", config_name="tiny", training_recipe="quick")


def test_the_card_names_the_training_only_methods():
    fast = TrainingOptions(dataset="d", config_name="tiny", training_recipe="fast").with_recipe(CONFIG)
    assert training_methods(TrainingOptions(dataset="d", config_name="tiny")) == []
    assert training_methods(fast) == [
        "H-DETR's hybrid matching (60 extra queries, each box repeated 6 times, loss weight 1)",
        "the IoU-aware classification loss",
    ]


def test_a_fast_run_trains_with_hybrid_queries_and_says_so(shapes_folder, tmp_path):
    train(options(shapes_folder, tmp_path, max_steps=2, eval_every_epochs=0, training_recipe="fast"))
    history = json.load(open(tmp_path / "history.json"))
    assert "loss_ce_hybrid" in history[0]
    card = (tmp_path / "README.md").read_text()
    assert "H-DETR's hybrid matching (50 extra queries" in card and "IoU-aware" in card
    assert "--training_recipe fast" in card
