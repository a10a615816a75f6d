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
        config_overrides={"d_model": 64, "encoder_layers": 1, "two_stage": True, "dropout": 0.05},
        multi_scale=[96, 128],
        checkpointing_steps=5,
        report_to=["tensorboard"],
        mixed_precision="bf16",
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
    """A prefix of an option is no option: argparse would read --weight 0.5 as --weight_decay 0.5."""
    with pytest.raises(SystemExit):
        parser().parse_args(words)
    assert f"unrecognized arguments: {words[-2]} {words[-1]}" in capsys.readouterr().err


def test_help_shows_the_defaults_that_say_something():
    """No "(default: True)" for --no_check (it would read as skipping the check by default), no "(default: None)",
    and one default for --device, whose help gives it."""
    export, detect = export_parser().format_help(), detect_parser().format_help()
    assert "(default: True)" not in export and "(default: 18)" in export
    assert "(default: None)" not in detect and detect.count("(default: cuda if present, else cpu)") == 1
    assert "(default: 0.5)" in detect  # --threshold


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"config_name": "tiny", "model_name_or_path": "x"}, "model_name_or_path .* config_name .*, not both"),
        ({"model_name_or_path": "x", "config_overrides": {"d_model": 8}}, "config_overrides changes a fresh model"),
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
        ({"config_name": "tiny", "checkpointing_steps": 0}, r"checkpointing_steps .*\(at least 1\), got 0$"),
        ({"config_name": "tiny", "checkpointing_steps": "0"}, r"checkpointing_steps .*\(at least 1\), got 0$"),
        ({"config_name": "tiny", "multi_scale": [96, 0]}, 'multi_scale must be positive sides .*, got "96,0"'),
        ({"config_name": "tiny", "config_overrides": "d_model"}, "config_overrides must be key=value pairs"),
        ({"config_name": "tiny", "lr_scheduler": "linear"}, r"lr_scheduler must be one of \('step', 'cosine'\)"),
        ({"config_name": "tiny", "metric_for_best_model": "accuracy"}, "metric_for_best_model must be one of"),
        ({"config_name": "tiny", "lr_drop": 2.0}, r"lr_drop must be a share of the steps, in \(0, 1\], got 2.0"),
        ({"config_name": "tiny", "image_size": 320, "max_image_size": 100}, r"max_image_size \(100\) must be at"),
    ],
)
def test_options_that_cannot_work_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingOptions(dataset="d", **fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"per_device_train_batch_size": "2"}, r"^per_device_train_batch_size must be an int, got '2' \(str\)$"),
        ({"per_device_train_batch_size": 2.0}, r"^per_device_train_batch_size must be an int, got 2.0 \(float\)$"),
        ({"image_size": True}, r"^image_size must be an int, got True \(bool\)$"),
        ({"learning_rate": "1e-4"}, r"^learning_rate must be a number, got '1e-4' \(str\)$"),
        ({"no_augmentation": 1}, r"^no_augmentation must be True or False, got 1 \(int\)$"),
        ({"max_steps": 2.5}, r"^max_steps must be an int or None, got 2.5 \(float\)$"),
        ({"output_dir": 3}, r"^output_dir must be a str, got 3 \(int\)$"),
        ({"checkpointing_steps": 1.5}, r'^checkpointing_steps must be "epoch", "no" or an int, got 1.5 \(float\)$'),
        ({"multi_scale": [96, "128"]}, r"^multi_scale must be a list of int or None, got \[96, '128'\] \(list\)$"),
        ({"multi_scale": (96, 128)}, r"^multi_scale must be a list of int or None, got \(96, 128\) \(tuple\)$"),
        ({"config_overrides": {"d_model": [64]}}, r"^config_overrides must be a dict of str to bool \| int"),
        ({"report_to": ("wandb",)}, r'^report_to must be "none", "all" or a list of str, got \(\'wandb\',\)'),
        ({"lr_scheduler": 1}, r"^lr_scheduler must be one of \('step', 'cosine'\), got 1 \(int\)$"),
        ({"mixed_precision": True}, r"^mixed_precision must be one of \('no', 'bf16', 'fp16'\) or None, got True"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_with_its_option(fields, message):
    with pytest.raises(TypeError, match=message):
        TrainingOptions(dataset="d", config_name="tiny", **fields)


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("checkpointing_steps", "500", 500),
        ("checkpointing_steps", "epoch", "epoch"),
        ("checkpointing_steps", "no", "no"),
        ("multi_scale", "480,512,544", [480, 512, 544]),
        ("multi_scale", "96, 128", [96, 128]),
        ("report_to", "tensorboard,wandb", ["tensorboard", "wandb"]),
        ("report_to", "tensorboard", ["tensorboard"]),
        ("report_to", "all", "all"),
        ("report_to", "none", "none"),
        ("config_overrides", "a=1,b=true,c=0.5,d=resnet18", {"a": 1, "b": True, "c": 0.5, "d": "resnet18"}),
        ("config_overrides", "d_model=64, encoder_layers=1", {"d_model": 64, "encoder_layers": 1}),
        ("mixed_precision", "bf16", "bf16"),
        ("max_steps", "7", 7),
        ("learning_rate", "1e-4", 1e-4),
    ],
)
def test_the_command_line_text_of_an_option_is_its_typed_value(name, text, value, monkeypatch):
    """The command's flag and the option's text in Python give the same typed value, which prints back as text
    that gives it again."""
    from deformable_detr.engine.options import option_from_text, option_text
    from deformable_detr.engine.tracking import TRACKERS

    monkeypatch.setitem(TRACKERS, "wandb", "tensorboard")  # a tracker's package that is installed here

    assert option_from_text(name, text) == value and type(option_from_text(name, text)) is type(value)
    assert option_from_text(name, option_text(value)) == value
    flags = ["--dataset", "d", "--config_name", "tiny", f"--{name}", text]
    assert getattr(train_parser().parse_args(flags), name) == value
    if name not in ("mixed_precision", "max_steps", "learning_rate"):  # int, float and word options take only those
        assert getattr(TrainingOptions(dataset="d", config_name="tiny", **{name: text}), name) == value


def test_checkpointing_steps_takes_a_number_or_its_two_words():
    assert TrainingOptions(dataset="d", checkpointing_steps=500).checkpoint_every() == 500
    assert TrainingOptions(dataset="d", checkpointing_steps="epoch").checkpoint_every() == 0
    assert TrainingOptions(dataset="d", checkpointing_steps="no").checkpointing_steps == "no"


def test_a_bad_command_line_value_is_a_usage_error_naming_the_option(capsys):
    for flag, text, message in [
        ("--checkpointing_steps", "often", 'checkpointing_steps must be "epoch", "no" or a number of steps'),
        ("--multi_scale", "96,abc", 'multi_scale must be positive sides separated by commas, got "96,abc"'),
        ("--image_size", "big", 'image_size must be an int, got "big"'),
        ("--config_overrides", "d_model", "config_overrides must be key=value pairs separated by commas"),
        ("--lr_scheduler", "linear", "invalid choice: 'linear'"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            train_parser().parse_args(["--dataset", "d", flag, text])
        assert stopped.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_trackers_log_every_set_option_as_a_value():
    options = TrainingOptions(
        dataset="d", config_name="tiny", config_overrides={"d_model": 64}, multi_scale=[96], hub_token=None
    )
    logged = options.hyperparameters()
    assert logged["config_overrides"] == "d_model=64" and logged["multi_scale"] == "96"
    assert logged["checkpointing_steps"] == "epoch" and logged["report_to"] == "none" and logged["image_size"] == 800
    assert "hub_token" not in logged and "model_name_or_path" not in logged
    assert all(isinstance(value, (bool, int, float, str)) for value in logged.values())


def norms(model) -> set[type]:
    return {type(m) for m in model.model.backbone.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))}


def test_a_fresh_backbone_trains_its_batch_norms_unless_told_otherwise():
    """Deliberate difference from the paper's code, which always freezes them: a backbone without pretrained
    weights must learn its batch norms (frozen identity ones left a random ResNet at 0.007 mAP)."""
    fresh = build_model(TrainingOptions(dataset="d", config_name="tiny"), ["a", "b"])
    assert fresh.config.freeze_backbone_batch_norms is False and norms(fresh) == {nn.BatchNorm2d}
    frozen = build_model(
        TrainingOptions(dataset="d", config_name="tiny", config_overrides={"freeze_backbone_batch_norms": True}),
        ["a"],
    )
    assert frozen.config.freeze_backbone_batch_norms is True and norms(frozen) == {FrozenBatchNorm2d}


def test_without_a_model_the_papers_coco_model_is_fine_tuned():
    """Neither model_name_or_path nor config_name: the paper's COCO checkpoint."""
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
