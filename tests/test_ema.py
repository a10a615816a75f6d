"""The weight average (--ema_decay, engine/ema.py): its arithmetic, and in training that it is what is evaluated
and saved and that a resumed run continues it exactly."""

import math

import torch
from safetensors.torch import load_file

from deformable_detr.engine import train
from deformable_detr.engine.ema import WeightAverage
from tests.support.training import options


def test_the_average_follows_its_formula_with_warmup():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.9, warmup_steps=2)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0], start=1):
        with torch.no_grad():
            model.weight.fill_(value)
        d = 0.9 * (1 - math.exp(-step / 2))
        expected = d * expected + (1 - d) * value
        average.update(model)
    assert torch.allclose(average.average["weight"], torch.full((1, 2), expected))
    with average.applied(model):
        assert torch.equal(model.weight, average.average["weight"])
    assert torch.equal(model.weight, torch.full((1, 2), 3.0))  # its own weights back


def test_training_saves_the_average_and_resumes_it_exactly(shapes_folder, tmp_path):
    """Six steps in one go, and four then two from checkpoint-4: the same saved average, bit for bit; it is not
    the raw weights, which a run without the average saves."""
    common = dict(max_steps=6, eval_every_epochs=0, ema_decay=0.9, ema_warmup_steps=2)
    train(options(shapes_folder, tmp_path / "whole", **common, checkpointing_steps="4"))
    train(
        options(
            shapes_folder,
            tmp_path / "resumed",
            **common,
            resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"),
        )
    )
    train(options(shapes_folder, tmp_path / "raw", max_steps=6, eval_every_epochs=0, checkpointing_steps="no"))
    whole, resumed, raw = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed", "raw"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert any(not torch.equal(whole[k], raw[k]) for k in whole if whole[k].is_floating_point())
    assert (tmp_path / "whole" / "checkpoint-4" / "ema.safetensors").exists()
