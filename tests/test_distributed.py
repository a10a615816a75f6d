"""Data-parallel training on the CPU: two processes (gloo) through torchrun, as accelerate runs them; and the
training-only queries in two processes, data-parallel and sharded (FSDP2)."""

import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.apps.evaluate import evaluate_saved_model
from deformable_detr.engine import TrainingOptions, train
from deformable_detr.engine.parallel import parallel_for
from deformable_detr.engine.query_groups import FILE
from tests.support.processes import free_port, run_command, torchrun
from tests.support.training import TINY, command_line, training_options
from tests.test_sharding import FSDP_CONFIG

# runs the training command and saves the initial weights and every rank's final weights (and training-only ones),
# gathered whole where they are sharded
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
def whole(module):
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in module.state_dict().items()}
def save_every_rank(self, *args, **kwargs):
    rank = self.accelerator.process_index
    torch.save(whole(self.bare_model), f"{sys.argv[1]}/rank{rank}.pt")
    if self.queries is not None:
        torch.save(whole(self.queries), f"{sys.argv[1]}/queries{rank}.pt")
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


def launched(kind: str, driver, folder, options: TrainingOptions):
    """The driver in two CPU processes: data-parallel through torchrun, or sharded (FSDP2) through accelerate launch
    with an FSDP config."""
    folder.mkdir(exist_ok=True)
    if kind == "data_parallel":
        return torchrun(str(driver), folder, *command_line(options))
    config = folder / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    environment = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    command += ["--main_process_port", free_port(), driver, folder, *command_line(options)]
    return run_command(command, env=environment, timeout=600)


@pytest.mark.parametrize("kind", ["data_parallel", "sharded"])
def test_extra_queries_train_in_two_processes_and_resume_exactly(data, tmp_path, kind):
    """Hybrid queries and two groups in two processes: the extra queries train, their gradients synchronised
    (equal on both ranks); the saved model is a plain one; resumed from the step-2 checkpoint, the run ends with the
    uninterrupted run's weights and extra queries, bit for bit."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    extra = dict(hybrid_queries=6, hybrid_repeats=2, query_groups=2, classification_loss="iou_aware")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launched(kind, driver, whole, training_options(data, whole, 1, checkpointing_steps="2", **extra))
    if kind == "sharded":
        assert "sharding the model across 2 CPU processes" in (whole / "train.log").read_text()
    queries, weights = ([torch.load(whole / f"{name}{rank}.pt") for rank in (0, 1)] for name in ("queries", "rank"))
    assert torch.equal(queries[0]["query_embed.weight"], queries[1]["query_embed.weight"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    at_step_2 = load_file(whole / "checkpoint-2" / FILE)["query_embed.weight"]
    assert at_step_2.shape == (10 + 6, 64) and not torch.equal(at_step_2, queries[0]["query_embed.weight"])
    saved = [whole] + ([whole / "checkpoint-2"] if kind == "data_parallel" else [])  # (shards hold no model file)
    for folder in saved:
        _, info = DeformableDetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], folder

    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    launched(kind, driver, resumed, training_options(data, resumed, 1, resume_from_checkpoint="latest", **extra))
    final, again = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    resumed_queries = torch.load(resumed / "queries0.pt")["query_embed.weight"]
    assert torch.equal(resumed_queries, queries[0]["query_embed.weight"])


def test_extra_queries_are_refused_where_their_checkpoint_file_cannot_be_gathered():
    """accelerate's FSDP version 1 and DeepSpeed keep flat shards, from which the extra queries' file cannot be
    gathered: named at the start; FSDP2 takes them."""
    options = TrainingOptions(dataset="d", config_name="tiny", hybrid_queries=4)
    for kind, fsdp2 in ((DistributedType.FSDP, False), (DistributedType.DEEPSPEED, False)):
        with pytest.raises(ValueError, match="one_to_many_heads: not available with accelerate's FSDP version 1"):
            parallel_for(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2), options)
    accepted = parallel_for(SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True), options)
    assert type(accepted).__name__ == "AccelerateShards"
