"""Data-parallel training on the CPU: two processes (gloo) through torchrun, as accelerate runs them."""

import json

import pytest
import torch

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.apps.evaluate import evaluate_saved_model
from deformable_detr.engine import train
from tests.support.processes import torchrun
from tests.support.training import TINY, command_line, training_options

# runs the training command and saves the initial weights and every rank's final weights
DRIVER = """
import sys, torch
from deformable_detr.engine import trainer as t
from deformable_detr.apps.cli import train_main
build_model = t.build_model
def save_initial(*args):
    model = build_model(*args)
    torch.save(model.state_dict(), f"{sys.argv[1]}/initial.pt")
    return model
t.build_model = save_initial
finish = t.Trainer.finish
def save_every_rank(self, *args, **kwargs):
    torch.save(self.bare_model.state_dict(), f"{sys.argv[1]}/rank{self.accelerator.process_index}.pt")
    finish(self, *args, **kwargs)
t.Trainer.finish = save_every_rank
train_main(sys.argv[2:])
"""


@pytest.fixture(scope="module")
def data(shapes_coco):
    # 5 validation images: two processes get 3 and 2, so the last batch is padded with a repeat
    return shapes_coco(8, 5)


def test_two_processes_match_one_with_the_whole_batch(data, tmp_path):
    """2 processes x batch 1 = 1 process x batch 2: same weights (the loss's num_boxes and the gradients are
    averaged over the processes), both ranks identical, and the same validation mAP."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    two = tmp_path / "two"
    two.mkdir()
    torchrun(str(driver), two, *command_line(training_options(data, two, 1)))
    assert "on 2 process(es)" in (two / "train.log").read_text()
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    one_metrics = train(training_options(data, tmp_path / "one", 2))
    # loaded back, as saves write transformers' layer names
    one = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "one").state_dict()
    worst = max((one[k] - rank0[k]).abs().max().item() for k in one)
    print(f"largest weight difference, 2 x batch 1 vs 1 x batch 2: {worst:.2e}")
    assert worst < 1e-4, worst  # float sums in another order; a wrong num_boxes would be off by far more

    two_metrics = json.load(open(two / "eval_results.json"))
    assert two_metrics["map"] == pytest.approx(one_metrics["map"], abs=1e-3)

    # the same saved model, evaluated by one and by two processes: the same numbers
    single = evaluate_saved_model(str(tmp_path / "one"), data)
    evaluate = tmp_path / "evaluate.py"
    evaluate.write_text("import sys\nfrom deformable_detr.apps.cli import evaluate_main\nevaluate_main(sys.argv[1:])\n")
    torchrun(
        str(evaluate),
        "--model",
        tmp_path / "one",
        "--dataset",
        data,
        "--batch_size",
        1,
        "--output",
        tmp_path / "two_eval.json",
    )
    assert json.load(open(tmp_path / "two_eval.json")) == json.loads(json.dumps(single))


def test_two_stage_without_auxiliary_loss(data, tmp_path):
    """Parameters without a gradient in a step (the earlier layers' class heads here) do not stop DDP."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = TINY + ",with_box_refine=true,two_stage=true,two_stage_num_proposals=10,auxiliary_loss=false"
    options = training_options(data, tmp_path, 1, eval_every_epochs=0, config_overrides=overrides)
    torchrun(str(driver), tmp_path, *command_line(options))
    initial, rank0, rank1 = (torch.load(tmp_path / f"{name}.pt") for name in ("initial", "rank0", "rank1"))
    assert all(torch.equal(rank0[key], rank1[key]) for key in rank0)
    for unused in ("class_embed.0.weight", "model.decoder.bbox_embed.0.layers.2.bias"):  # no gradient: not updated
        assert torch.equal(rank0[unused], initial[unused]), unused
    for trained in ("class_embed.1.weight", "model.enc_class_embed.weight", "model.decoder.bbox_embed.1.layers.2.bias"):
        assert not torch.equal(rank0[trained], initial[trained]), trained
