"""TrainingOptions: checked as a whole, the command's flags made from it, and what a fresh model gets."""

import shlex

import pytest
from torch import nn

from deformable_detr.apps.cli import detect_parser, export_parser, train_parser
from deformable_detr.engine import TrainingOptions
from deformable_detr.engine.model_setup import build_model, parameter_groups
from deformable_detr.model.backbone import FrozenBatchNorm2d


def test_the_command_line_round_trips_and_hides_the_token():
    options = TrainingOptions(
        dataset="data dir",
        config_name="tiny",
        config_overrides="d_model=64,encoder_layers=1",
        max_steps=7,
        no_augmentation=True,
        push_to_hub=True,
        hub_token="hf_secret",
    )
    command = options.command()
    assert "hf_secret" not in command and "--hub_token '***'" in command
    words = shlex.split(command)
    assert words[0] == "deformable-detr-train"
    parsed = TrainingOptions(**vars(train_parser().parse_args(words[1:])))
    assert parsed == TrainingOptions(**{**vars(options), "hub_token": "***"})
    assert (
        TrainingOptions(dataset="d", config_name="tiny").command()
        == "deformable-detr-train --dataset d --config_name tiny"
    )


@pytest.mark.parametrize(
    "parser, words",
    [
        (train_parser, ["--dataset", "d", "--config_name", "tiny", "--weight", "0.5"]),  # not --weight_decay
        (detect_parser, ["image.jpg", "--model", "m", "--thresh", "0.9"]),  # not --threshold
    ],
)
def test_abbreviated_options_are_refused(parser, words, capsys):
    """An abbreviation would silently set another option: --weight 0.5 became --weight_decay 0.5."""
    with pytest.raises(SystemExit):
        parser().parse_args(words)
    assert f"unrecognized arguments: {words[-2]} {words[-1]}" in capsys.readouterr().err


def test_help_shows_the_defaults_that_say_something():
    """--no_check said "(default: True)", which reads as skipping the check by default; --device gave two."""
    export, detect = export_parser().format_help(), detect_parser().format_help()
    assert "(default: True)" not in export and "(default: 18)" in export
    assert "(default: None)" not in detect and detect.count("(default: cuda if present, else cpu)") == 1
    assert "(default: 0.5)" in detect  # --threshold


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"config_name": "tiny", "model_name_or_path": "x"}, "model_name_or_path .* config_name .*, not both"),
        ({"model_name_or_path": "x", "config_overrides": "d_model=8"}, "config_overrides changes a fresh model"),
        ({"config_name": "tiny", "max_steps": 0}, "max_steps must be at least 1, got 0"),
        ({"config_name": "tiny", "image_size": 0}, "image_size must be at least 1, got 0"),
        ({"config_name": "tiny", "checkpointing_steps": "often"}, 'checkpointing_steps must be "epoch", "no"'),
        ({"config_name": "tiny", "mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"config_name": "tiny", "hub_token": "t"}, "need push_to_hub"),
        ({"config_name": "tiny", "learning_rate": -1.0}, "learning_rate must be a finite number, at least 0, got -1.0"),
        (
            {"config_name": "tiny", "learning_rate": float("inf")},
            "learning_rate must be a finite number, at least 0, got inf",
        ),
        (
            {"config_name": "tiny", "backbone_learning_rate": float("nan")},
            "backbone_learning_rate must be a finite number, at least 0",
        ),
        ({"config_name": "tiny", "max_grad_norm": -1.0}, "max_grad_norm must be a finite number, at least 0"),
        ({"config_name": "tiny", "eval_every_epochs": -1}, "eval_every_epochs must be a finite number, at least 0"),
        (
            {"config_name": "tiny", "sampling_lr_factor": -1.0},
            "sampling_lr_factor must be a finite number, at least 0, got -1.0",
        ),
        ({"config_name": "tiny", "num_workers": -1}, "num_workers must be a finite number, at least 0, got -1"),
        ({"config_name": "tiny", "checkpointing_steps": 0}, r"checkpointing_steps .*\(at least 1\), got '0'"),
        ({"config_name": "tiny", "lr_drop": 2.0}, r"lr_drop must be a share of the steps, in \(0, 1\], got 2.0"),
        ({"config_name": "tiny", "image_size": 320, "max_image_size": 100}, r"max_image_size \(100\) must be at"),
    ],
)
def test_options_that_cannot_work_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingOptions(dataset="d", **fields)


def norms(model) -> set[type]:
    return {type(m) for m in model.model.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


def test_a_fresh_backbone_trains_its_batch_norms_unless_told_otherwise():
    """Deliberate difference from the paper's code, which always freezes them: a backbone without pretrained
    weights must learn its batch norms (frozen identity ones left a random ResNet at 0.007 mAP)."""
    fresh = build_model(TrainingOptions(dataset="d", config_name="tiny"), ["a", "b"])
    assert fresh.config.freeze_backbone_batch_norms is False and norms(fresh) == {nn.BatchNorm2d}
    frozen = build_model(
        TrainingOptions(dataset="d", config_name="tiny", config_overrides="freeze_backbone_batch_norms=true"), ["a"]
    )
    assert frozen.config.freeze_backbone_batch_norms is True and norms(frozen) == {FrozenBatchNorm2d}


def test_without_a_model_the_papers_coco_model_is_fine_tuned():
    """Neither model_name_or_path nor config_name: the paper's COCO checkpoint (an error before)."""
    options = TrainingOptions(dataset="d")
    assert options.model_name_or_path == "SenseTime/deformable-detr" and options.config_name is None
    assert TrainingOptions(dataset="d", config_name="tiny").model_name_or_path is None


@pytest.mark.parametrize("variant", [{}, {"with_box_refine": True}, {"with_box_refine": True, "two_stage": True}])
def test_the_three_learning_rates_go_to_the_backbone_the_sampling_modules_and_the_rest(variant):
    """The groups hold, in the model's order, the backbone's parameters, those of every sampling_offsets and
    reference_points module, and all others: the parameters these names pick."""
    from tests.support.models import tiny_model

    model = tiny_model(**variant)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    by_name = {
        "backbone": [p for name, p in trainable if name.startswith("model.backbone.")],
        "sampling": [
            p
            for name, p in trainable
            if not name.startswith("model.backbone.") and ("sampling_offsets" in name or "reference_points" in name)
        ],
    }
    by_name["rest"] = [p for _, p in trainable if not any(p is q for q in by_name["backbone"] + by_name["sampling"])]
    options = TrainingOptions(dataset="d", config_name="tiny", learning_rate=1e-3, sampling_lr_factor=0.5)
    groups = parameter_groups(model, options)
    assert [group["name"] for group in groups] == ["backbone", "sampling", "rest"]
    for group in groups:
        assert [id(p) for p in group["params"]] == [id(p) for p in by_name[group["name"]]], group["name"]
    assert [group["lr"] for group in groups] == [options.backbone_learning_rate, 5e-4, 1e-3]
    assert len(by_name["sampling"]) == 2 * (model.config.encoder_layers + model.config.decoder_layers) + 2 * (
        not model.config.two_stage
    )
