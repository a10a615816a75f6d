"""Sharded training (FSDP2) on CPUs: `accelerate launch` with an FSDP config and two gloo processes, which the
trainer shards itself (parallel.py's CpuShards) as accelerate shards on GPUs only."""

import json
import os
import shutil
import sys
from dataclasses import asdict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.engine import TrainingOptions, train
from deformable_detr.engine.checkpoints import TrainState
from deformable_detr.engine.launch import check_launch
from deformable_detr.engine.parallel import check_shardable, load_shards
from tests.support.processes import free_port, run_command, torchrun
from tests.support.training import TINY, command_line, training_options

# the recipe of docs/training.md, for two CPU processes in full precision
FSDP_CONFIG = """\
distributed_type: FSDP
num_processes: 2
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: SIZE_BASED_WRAP
  fsdp_min_num_params: 1000000
  fsdp_state_dict_type: FULL_STATE_DICT
"""


def accelerate_launch(config, options: TrainingOptions, use_cpu=True, returncode=0):
    """The training command under `accelerate launch --config_file config`, one thread a process."""
    environment = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"} | {"OMP_NUM_THREADS": "1"}
    if use_cpu:
        environment["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    command += ["--main_process_port", free_port(), "-m", "deformable_detr", "train", *command_line(options)]
    return run_command(command, env=environment, timeout=600, returncode=returncode)


UNUSED = TINY + ",with_box_refine=true,auxiliary_loss=false"  # parameters without a gradient


def run_options(data, output_dir, **changes) -> TrainingOptions:
    """The sharded runs' and their data-parallel reference's options: 4 steps with a weight average."""
    return training_options(data, output_dir, 1, config_overrides=UNUSED, ema_decay=0.9, ema_warmup_steps=1, **changes)


@pytest.fixture(scope="module")
def data(shapes_coco):
    return shapes_coco(8, 4)


def test_sharded_training_matches_data_parallel_resumes_and_saves_a_whole_model(data, tmp_path):
    """With box refinement but no auxiliary loss, the earlier layers' class heads get no gradient, so no
    optimiser state, which the checkpoint and the resume must handle too; the weight average (--ema_decay) is
    sharded with the weights, and is what the model saves."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    sharded = tmp_path / "sharded"
    accelerate_launch(config, run_options(data, sharded, checkpointing_steps="2"))
    assert "sharding the model across 2 CPU processes" in (sharded / "train.log").read_text()
    shards = sorted(p.name for p in (sharded / "checkpoint-2").glob("shards-*"))
    assert shards == ["shards-0-of-2.safetensors", "shards-1-of-2.safetensors"]
    weights = load_file(sharded / "model.safetensors")

    # the same steps data-parallel (whole weights on each process): the same weights
    parallel = tmp_path / "parallel"
    driver = tmp_path / "train.py"
    driver.write_text("import sys\nfrom deformable_detr.apps.cli import train_main\ntrain_main(sys.argv[1:])\n")
    torchrun(str(driver), *command_line(run_options(data, parallel)))
    reference = load_file(parallel / "model.safetensors")
    assert weights.keys() == reference.keys()
    worst = max((weights[k] - reference[k]).abs().max().item() for k in weights)
    print(f"largest weight difference, sharded vs data-parallel: {worst:.2e}")
    assert worst < 1e-4, worst  # sums in another order (reduce-scatter against all-reduce)

    # resumed from the step-2 checkpoint: the uninterrupted run's weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(sharded / "checkpoint-2", resumed / "checkpoint-2")
    accelerate_launch(config, run_options(data, resumed, resume_from_checkpoint="latest"))
    again = load_file(resumed / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    # a checkpoint without a weight average (as a run without --ema_decay writes): it starts again, with a warning
    plain = tmp_path / "plain"
    shutil.copytree(sharded / "checkpoint-2", plain / "checkpoint-2")
    for path in (plain / "checkpoint-2").glob("shards-*"):
        with safe_open(path, "pt") as f:
            metadata, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.startswith("ema.")}
        save_file(kept, path, metadata=metadata)
    result = accelerate_launch(config, run_options(data, plain, resume_from_checkpoint="latest"))
    assert "holds no weight average (ema.*): it starts from the resumed weights" in result.stderr
    assert not torch.equal(load_file(plain / "model.safetensors")["class_embed.1.bias"], weights["class_embed.1.bias"])

    # the saved model loads whole and gives the data-parallel model's outputs
    image = torch.rand(1, 3, 64, 64)
    ours, theirs = (DeformableDetrForObjectDetection.from_pretrained(p).eval() for p in (sharded, parallel))
    with torch.no_grad():
        a, b = ours(pixel_values=image), theirs(pixel_values=image)
    assert (a.logits - b.logits).abs().max() < 1e-4
    assert (a.pred_boxes - b.pred_boxes).abs().max() < 1e-4


def test_a_sharded_checkpoint_is_not_resumed_unsharded(data, tmp_path):
    """One process (no FSDP launch) would find no weights in it and go on from fresh ones: refused, named."""
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps(asdict(TrainState(global_step=2))))
    (checkpoint / "shards-0-of-2.safetensors").write_bytes(b"")
    options = training_options(data, tmp_path, 1, resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=r"checkpoint-2 holds the shards of a sharded \(FSDP\) run over 2 processes"):
        train(options)


def test_cpu_processes_launched_without_accelerate_use_cpu_are_refused(data, tmp_path):
    """Without ACCELERATE_USE_CPU=1, accelerate launch on a machine without GPUs starts 2 processes that accelerate
    does not join: each would train alone over the same output_dir."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    result = accelerate_launch(config, training_options(data, tmp_path / "out", 1), use_cpu=False, returncode=1)
    assert "2 processes were launched (WORLD_SIZE=2)" in result.stderr
    assert "set ACCELERATE_USE_CPU=1" in result.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_checkpoint_without_shards_is_not_resumed_sharded(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no shards: it was written without sharding"):
        load_shards(str(tmp_path), None, None, 0, 2)


def test_processes_that_accelerate_does_not_see_are_refused(monkeypatch):
    """accelerate launch on a machine without GPUs, without ACCELERATE_USE_CPU: each process would train alone."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2.*ACCELERATE_USE_CPU=1"):
        check_launch(1)
    check_launch(2)


def test_options_that_sharding_does_not_take_are_named(tmp_path):
    options = TrainingOptions(
        dataset="shapes", config_name="tiny", output_dir=str(tmp_path), torch_compile=True, mixed_precision="fp16"
    )
    with pytest.raises(ValueError, match="mixed_precision fp16, torch_compile: not available with sharded"):
        check_shardable(options)
