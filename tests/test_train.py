"""The training command end to end, on small generated data and tiny models."""

import glob
import io
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from deformable_detr import DeformableDetrForObjectDetection
from deformable_detr.apps.cli import evaluate_main, train_main
from deformable_detr.apps.evaluate import evaluate_saved_model
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.engine import TrainingOptions, train
from deformable_detr.metrics.evaluation import format_metrics
from deformable_detr.testing import small_hf_config
from tests.support.datasets_on_disk import write_coco
from tests.support.models import TINY_OVERRIDES, serve_transformers_checkpoint
from tests.support.training import options


def history(output_dir, key="loss"):
    with open(os.path.join(output_dir, "history.json")) as f:
        return [h[key] for h in json.load(f) if key in h]


def test_loss_falls_on_a_fixed_batch(tmp_path, capsys):
    """Training and validation on the same four images: the loss falls and the detections start to match."""
    same = shapes_dataset(4, 64, seed=1)
    data = write_coco({"train": same, "valid": same}, CLASS_NAMES, str(tmp_path / "data"))
    metrics = train(
        options(
            data,
            tmp_path / "run",
            max_steps=40,
            no_augmentation=True,
            per_device_train_batch_size=4,
            lr_drop=1.0,
            learning_rate=1e-3,
            overrides=TINY_OVERRIDES + ",dropout=0.0",
        )
    )
    losses = history(tmp_path / "run")
    assert len(losses) == 40
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["map_50"] > 0.1, metrics
    # the evaluation command scores the saved model the same way
    capsys.readouterr()
    again = evaluate_saved_model(str(tmp_path / "run"), data, output=str(tmp_path / "m.json"))
    assert again == metrics and capsys.readouterr().out == ""  # the library prints nothing, the command does
    assert json.load(open(tmp_path / "m.json")) == json.loads(json.dumps(metrics))
    evaluate_main(["--model", str(tmp_path / "run"), "--dataset", data, "--output", str(tmp_path / "cli.json")])
    assert json.load(open(tmp_path / "cli.json")) == json.loads(json.dumps(metrics))
    table = format_metrics(metrics)
    written = f"metrics written to {tmp_path / 'cli.json'}"
    pictures = f"precision-recall curves and confusion matrix written to {tmp_path}"
    assert capsys.readouterr().out == f"{tmp_path / 'run'} on {data} [validation]\n{table}\n{written}\n{pictures}\n"
    # a split the data lacks: an error naming it from the library, one line from the command
    with pytest.raises(ValueError, match="has no split 'nope'; it has"):
        evaluate_saved_model(str(tmp_path / "run"), data, "nope")
    with pytest.raises(SystemExit, match="^deformable-detr-evaluate: error: .* has no split 'nope'"):
        evaluate_main(["--model", str(tmp_path / "run"), "--dataset", data, "--split", "nope"])


def test_outputs_card_and_evaluate_command(shapes_folder, tmp_path):
    metrics = train(options(shapes_folder, tmp_path, max_steps=3, with_tracking=True))
    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "modeling_deformable_detr.py",
        "README.md",
        "history.json",
        "eval_results.json",
        "train.log",
    ):
        assert os.path.isfile(tmp_path / name), name
    config = json.load(open(tmp_path / "config.json"))
    assert config["id2label"] == {str(i): n for i, n in enumerate(CLASS_NAMES)}
    card = open(tmp_path / "README.md").read()
    assert "mAP@[.5:.95]" in card and "--max_steps 3" in card and "circle" in card
    assert f'pipeline("object-detection", model="{tmp_path}", trust_remote_code=True)' in card  # loads this model
    assert glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
    assert set(metrics) >= {"map", "map_50", "map_75", "map_small", "map_medium", "map_large", "per_class"}


def test_resume_continues_exactly(shapes_folder, tmp_path):
    """Four steps, a checkpoint in the middle of the second epoch (three steps each), two more: the same weights
    as six steps in one go. Augmentation, dropout, gradient accumulation and the lr drop are all on."""
    common = dict(
        max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=1, eval_every_epochs=0, lr_drop=0.75
    )
    train(options(shapes_folder, tmp_path / "whole", **common, checkpointing_steps=4))
    state = json.load(open(tmp_path / "whole" / "checkpoint-4" / "trainer_state.json"))
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 2)
    assert state["lr_schedule"]["last_epoch"] == 4
    assert state["setup"] | {"model": None} == {
        "class_names": CLASS_NAMES,
        "dataset": shapes_folder,
        "images_per_step": 2,
        "model": None,
    }
    assert state["setup"]["model"]["d_model"] == 32 and state["setup"]["model"]["dropout"] == 0.1
    assert not glob.glob(str(tmp_path / "whole" / "checkpoint-4" / "custom_checkpoint_*"))  # no pickled objects
    train(
        options(
            shapes_folder,
            tmp_path / "resumed",
            **common,
            resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"),
        )
    )
    whole, resumed = (
        load_file(tmp_path / "whole" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    # (accelerate's checkpoint holds the weights under the model's own names, a saved model under transformers')
    start = load_file(tmp_path / "whole" / "checkpoint-4" / "model.safetensors")
    trained = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "whole").state_dict()
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert history(tmp_path / "whole") == history(tmp_path / "resumed")  # the log carries on from the checkpoint
    # each step logs the lr it took: 2e-4, then 2e-5 from step 5 (0.75 of 6 steps: the drop after four)
    assert history(tmp_path / "whole", "lr") == history(tmp_path / "resumed", "lr") == [2e-4] * 4 + [2e-5] * 2
    # another learning rate on resume applies from the checkpoint on, in place of the checkpoint's own
    faster = dict(common, learning_rate=1e-3, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    train(options(shapes_folder, tmp_path / "faster", **faster))
    assert history(tmp_path / "faster", "lr") == [2e-4] * 4 + [1e-4] * 2
    # a longer run resumed: the options' schedule from the first resumed step (the checkpoint's would drop at step 5)
    longer = dict(common, max_steps=12, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    train(options(shapes_folder, tmp_path / "longer", **longer))
    assert history(tmp_path / "longer", "lr") == [2e-4] * 9 + [2e-5] * 3
    # an epoch's last checkpoint resumed with max_steps at its step: the final evaluation, which it lacks, runs
    train(options(shapes_folder, tmp_path / "epochs", **dict(common, checkpointing_steps="epoch")))
    at_end = dict(common, max_steps=3, resume_from_checkpoint=str(tmp_path / "epochs" / "checkpoint-3"))
    assert train(options(shapes_folder, tmp_path / "at_end", **at_end))["map"] >= 0
    # a checkpoint beyond this run's steps: refused (the saved model went back to the checkpoint's weights)
    behind = dict(common, max_steps=3, resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))
    with pytest.raises(ValueError, match="checkpoint-4 is at step 4, beyond this run's 3 steps"):
        train(options(shapes_folder, tmp_path / "behind", **behind))
    # a finished run's folder without checkpoints: another run there would replace its model
    with pytest.raises(ValueError, match="holds the model of an earlier run"):
        train(options(shapes_folder, tmp_path / "resumed", **common))


def test_a_hub_that_fails_at_the_end_costs_no_work(shapes_folder, tmp_path, monkeypatch):
    """The repo is named once, before training: a Hub that fails later costs no work, as the model is saved and
    uploaded to the repo named then."""
    from deformable_detr.engine import trainer

    calls, pushed = [], []

    def hub_repo(options):
        calls.append(options.hub_model_id)
        if len(calls) > 1:
            raise ValueError("push_to_hub: the Hub repo cannot be reached (simulated)")
        return "user/" + options.hub_model_id

    monkeypatch.setattr(trainer, "hub_repo", hub_repo)
    monkeypatch.setattr(trainer, "push_to_hub", lambda options, repo_id: pushed.append(repo_id))
    train(options(shapes_folder, tmp_path, max_steps=2, push_to_hub=True, hub_model_id="run", eval_every_epochs=0))
    assert calls == ["run"] and pushed == ["user/run"]
    assert (tmp_path / "model.safetensors").exists() and 'model="user/run"' in (tmp_path / "README.md").read_text()


def test_an_accumulation_window_cut_short_by_the_epoch_is_a_mean_over_its_own_batches(shapes_folder, tmp_path):
    """Three batches of two images, accumulated by 3 or by 6 (cut short at the epoch's end): one step over the same
    batches, so the same gradient: accelerate divides each loss by 6 there, and the short window scales it back."""
    for window in (3, 6):
        train(options(shapes_folder, tmp_path / str(window), max_steps=1, gradient_accumulation_steps=window))
    assert history(tmp_path / "3") == history(tmp_path / "6")  # the same batches
    three, six = history(tmp_path / "3", "grad_norm"), history(tmp_path / "6", "grad_norm")
    assert six == pytest.approx(three, rel=1e-5)


def test_freeze_backbone_trains_only_the_transformer_and_heads(shapes_folder, tmp_path):
    """--freeze_backbone with a cosine schedule and warm-up: the backbone's saved weights are its initial ones;
    the rest moved."""
    run = options(shapes_folder, tmp_path, max_steps=2, eval_every_epochs=0, checkpointing_steps="1")
    train(run.__class__(**{**run.__dict__, "freeze_backbone": True, "lr_scheduler": "cosine", "warmup_steps": 1}))
    start = load_file(tmp_path / "checkpoint-1" / "model.safetensors")  # the model's own names, as the loaded model's
    end = DeformableDetrForObjectDetection.from_pretrained(tmp_path).state_dict()
    backbone = [k for k in end if ".backbone." in f".{k}"]
    assert backbone and all(torch.equal(start[k], end[k]) for k in backbone)
    assert any(not torch.equal(start[k], end[k]) for k in end if k not in backbone)


def nan_loss_on_call(monkeypatch, call: int):
    """The loss of the call-th batch (from 1) becomes NaN."""
    from deformable_detr.model import loss_deformable_detr

    forward = loss_deformable_detr.DeformableDetrLoss.forward
    calls = []

    def nan_on_that_call(self, *a, **k):
        loss, terms = forward(self, *a, **k)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == call else (loss, terms)

    monkeypatch.setattr(loss_deformable_detr.DeformableDetrLoss, "forward", nan_on_that_call)


def test_non_finite_loss_skips_the_step(shapes_folder, tmp_path, monkeypatch):
    nan_loss_on_call(monkeypatch, 2)
    train(options(shapes_folder, tmp_path, max_steps=3, eval_every_epochs=0))
    log = open(tmp_path / "train.log").read()
    assert "step 2: non-finite loss or gradient norm (nan); the step is skipped, 1 so far" in log
    assert "1 skipped step(s)" in log
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_new_labels_from_our_model_and_from_transformers(shapes_folder, tmp_path):
    from transformers import DeformableDetrForObjectDetection as HFModel

    hf = HFModel(small_hf_config(num_labels=5))
    hf.save_pretrained(tmp_path / "hf")
    train(
        options(
            shapes_folder,
            tmp_path / "from_hf",
            model_name_or_path=str(tmp_path / "hf"),
            max_steps=1,
            eval_every_epochs=0,
        )
    )
    model = DeformableDetrForObjectDetection.from_pretrained(tmp_path / "from_hf")
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    assert model.class_embed.weight.shape == (3, 64)
    # the same labels again: the trained class head is kept
    train(
        options(
            shapes_folder,
            tmp_path / "again",
            model_name_or_path=str(tmp_path / "from_hf"),
            max_steps=1,
            eval_every_epochs=0,
            learning_rate=0,
            backbone_learning_rate=0,
        )
    )
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert torch.equal(again["class_embed.weight"], model.class_embed.weight)


def test_bad_arguments_are_named(shapes_folder, tmp_path):
    """The library raises ValueError naming the option; the command turns it into one line, no traceback."""
    with pytest.raises(ValueError, match="config_name 'huge' is neither a config file/folder nor a preset"):
        train(TrainingOptions(dataset=shapes_folder, config_name="huge", output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="config_overrides 'd_model=oops'"):
        train(options(shapes_folder, tmp_path, overrides="d_model=oops"))
    with pytest.raises(ValueError, match="give one of model_name_or_path .* and config_name .*, not both"):
        TrainingOptions(dataset=shapes_folder, model_name_or_path="a", config_name="tiny")
    # an output_dir that is a file: one line from the command, no traceback
    (tmp_path / "a_file").write_text("")
    command = ["--dataset", shapes_folder, "--config_name", "tiny", "--output_dir", str(tmp_path / "a_file")]
    with pytest.raises(SystemExit, match="^deformable-detr-train: error: output_dir .*a_file is a file, not a folder"):
        train_main(command)


def test_a_second_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    """A second Ctrl-C ends the command with one line and status 130, not KeyboardInterrupt's traceback from
    wherever the run was (inside torch.save, say)."""
    from deformable_detr.engine import trainer

    def interrupted(options):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    with pytest.raises(SystemExit) as stopped:
        train_main(["--dataset", "data", "--config_name", "tiny"])
    error = capsys.readouterr().err
    assert stopped.value.code == 130 and "interrupted; a checkpoint being written" in error and "Traceback" not in error


def signalled_run(run: TrainingOptions, after: str, whole_group: bool = False) -> str:
    """Runs the training command of `run` in a fresh process, sends it SIGTERM (to its whole process group if
    `whole_group`) once train.log holds `after`, asserts that it exits with status 143; -> train.log."""
    command = [sys.executable, "-m", "deformable_detr", "train", *shlex.split(run.command())[1:]]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    log = os.path.join(run.output_dir, "train.log")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and after in open(log).read()):
        time.sleep(0.1)
    try:
        if whole_group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    return open(log).read()


@pytest.mark.parametrize("workers, whole_group", [(0, False), (2, True)])
def test_sigterm_writes_a_checkpoint(shapes_folder, tmp_path, workers, whole_group):
    """SIGTERM to the process, or (as timeout, SLURM, Kubernetes and systemd send it) to its whole process group,
    data workers included: a checkpoint, exit status 143, and the run continues from it."""
    run = options(shapes_folder, tmp_path, max_steps=10000, checkpointing_steps="no", num_workers=workers)
    log = signalled_run(run, "step 2,", whole_group)
    checkpoints = glob.glob(str(tmp_path / "checkpoint-*" / "trainer_state.json"))
    assert len(checkpoints) == 1
    state = json.load(open(checkpoints[0]))
    assert state["global_step"] >= 2
    assert state["seconds"] > 0  # the resumed run's model card counts this part's time too
    assert 'continue with resume_from_checkpoint="latest" (--resume_from_checkpoint latest)' in log
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        train(options(shapes_folder, tmp_path, max_steps=3))
    train(
        options(
            shapes_folder,
            tmp_path,
            max_steps=state["global_step"] + 1,
            resume_from_checkpoint="latest",
            eval_every_epochs=0,
        )
    )
    assert len(history(tmp_path)) == state["global_step"] + 1  # one logged loss per step, carried on


def test_sigterm_during_evaluation_stops_it(shapes_coco, tmp_path):
    """SIGTERM while the last step's 300 validation images are scored: the evaluation stops at the next batch (not
    at its end, past a scheduler's grace period), then a checkpoint, exit status 143. The resumed run runs the
    evaluation."""
    folder = shapes_coco(6, 300)
    run = options(folder, tmp_path, max_steps=3, checkpointing_steps="no", per_device_eval_batch_size=1)
    log = signalled_run(run, "step 3,")
    assert "the evaluation after epoch 1 was stopped; it runs when the run is resumed" in log
    assert "validation:" not in log
    assert [os.path.basename(c) for c in glob.glob(str(tmp_path / "checkpoint-*"))] == ["checkpoint-3"]
    metrics = train(replace(run, resume_from_checkpoint="latest"))
    assert json.load(open(tmp_path / "eval_results.json")) == metrics and metrics["map"] >= 0


def test_mixed_precision_that_does_not_pay_on_the_cpu_warns(shapes_folder, tmp_path, monkeypatch):
    from deformable_detr.engine import trainer

    (tmp_path / "avx2").write_text("flags : fpu sse avx avx2 fma")
    (tmp_path / "sapphire").write_text("flags : fpu avx2 avx512f avx512_bf16 amx_bf16")
    assert trainer.cpu_lacks_bf16(str(tmp_path / "avx2")) == f"no avx512_bf16 or amx_bf16 in {tmp_path / 'avx2'}"
    assert trainer.cpu_lacks_bf16(str(tmp_path / "sapphire")) is None
    monkeypatch.setattr(trainer, "cpu_lacks_bf16", lambda: "no avx512_bf16 or amx_bf16 in /proc/cpuinfo")
    train(options(shapes_folder, tmp_path / "run", max_steps=1, mixed_precision="bf16", eval_every_epochs=0))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "mixed precision bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo)" in log
    # fp16 is not applied on the CPU at all: said, not left to look as if it ran
    train(options(shapes_folder, tmp_path / "fp16", max_steps=1, mixed_precision="fp16", eval_every_epochs=0))
    log = (tmp_path / "fp16" / "train.log").read_text()
    assert "mixed precision fp16 does nothing on the CPU: accelerate computes in fp32 there" in log


def test_the_best_model_is_kept_apart_and_early_stopping_stops(shapes_folder, tmp_path):
    """map_large is -1 on these 64x64 images (no large objects): the first evaluation is the best, no later one
    is better, so patience 2 stops after the third epoch of ten; best/ holds epoch 1's model through checkpoint
    rotation, and with load_best_model_at_end it is the saved model."""
    run = options(
        shapes_folder,
        tmp_path,
        num_train_epochs=10,
        checkpoints_total_limit=1,
        metric_for_best_model="map_large",
        early_stopping_patience=2,
        load_best_model_at_end=True,
    )
    train(run)
    best = json.load(open(tmp_path / "best" / "best.json"))
    assert best == {"metric": "map_large", "value": -1.0, "step": 3}  # 3 steps per epoch
    log = open(tmp_path / "train.log").read()
    assert "no better map_large in 2 evaluations: stopping early at step 9" in log
    assert [os.path.basename(c) for c in glob.glob(str(tmp_path / "checkpoint-*"))] == ["checkpoint-6"]  # 3 rotated
    saved, kept = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "best" / "model.safetensors")
    assert all(torch.equal(saved[k], kept[k]) for k in kept)
    with pytest.raises(ValueError, match="metric_for_best_model must be one of"):
        options(shapes_folder, tmp_path, metric_for_best_model="accuracy")


def test_torch_compile_trains_and_saves_plain_weights(shapes_folder, tmp_path):
    """--torch_compile: the network is compiled in whole graphs, the losses are eager training's (to compile's
    rounding), and the saved model has the model's own parameter names (not torch.compile's _orig_mod.) and
    loads."""
    common = dict(max_steps=2, eval_every_epochs=0, checkpointing_steps="no", no_augmentation=True)
    common["overrides"] = TINY_OVERRIDES + ",dropout=0.0"  # compiled dropout draws other random masks
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(options(shapes_folder, tmp_path / "compiled", torch_compile=True, **common))
    # the network is compiled without a break (the loss stays eager: its checks and matching would break the graph
    # and recompile it for every new count of objects in an image)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    # the matcher's scipy call is kept out of the graph on purpose: no warning of a failed trace
    assert not [w for w in caught if "linear_sum_assignment" in str(w.message)], [str(w.message) for w in caught]
    train(options(shapes_folder, tmp_path / "eager", **common))
    assert history(tmp_path / "compiled") == pytest.approx(history(tmp_path / "eager"), abs=1e-3)
    compiled, eager = (load_file(tmp_path / name / "model.safetensors") for name in ("compiled", "eager"))
    assert compiled.keys() == eager.keys()
    DeformableDetrForObjectDetection.from_pretrained(tmp_path / "compiled")


def test_a_skipped_first_step_keeps_the_schedule_without_torch_warning(shapes_folder, tmp_path, monkeypatch):
    """A non-finite first loss skips the optimiser step; the schedule still advances, as it does for every skipped
    step, without torch's warning that lr_scheduler.step() came before optimizer.step(), which reads as a bug of
    the user's (fp16's grad scaler skipping its first steps on GPUs is the same case)."""
    nan_loss_on_call(monkeypatch, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(options(shapes_folder, tmp_path, max_steps=2, eval_every_epochs=0))
    assert (
        "step 1: non-finite loss or gradient norm (nan); the step is skipped, 1 so far"
        in open(tmp_path / "train.log").read()
    )
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]


def linear_step(max_grad_norm=0.1):
    """A TrainingStep of a one-layer model with SGD and a constant schedule, on one CPU process."""
    from accelerate import Accelerator

    from deformable_detr.engine.trainer import TrainingStep

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, TrainingStep(model, optimizer, scheduler, Accelerator(cpu=True), max_grad_norm=max_grad_norm)


def test_a_non_finite_gradient_norm_skips_the_step_and_a_finite_one_is_returned(caplog):
    """optimiser_step reads the gradient norm once: an infinite one skips the step (weights kept, the step
    counted and named), a finite one is applied and returned as a float."""
    from deformable_detr.engine.checkpoints import TrainState

    model, step = linear_step()
    state = TrainState()
    before = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.full((1, 2), float("inf")), torch.zeros(1)
    with caplog.at_level(logging.WARNING):
        assert step.optimiser_step(state, torch.tensor(1.0)) is None
    assert torch.equal(model.weight, before) and state.skipped_steps == 1
    assert "step 1: non-finite loss or gradient norm (inf); the step is skipped, 1 so far" in caplog.text
    model.weight.grad, model.bias.grad = torch.tensor([[3.0, 4.0]]), torch.zeros(1)
    norm = step.optimiser_step(state, torch.tensor(1.0))
    assert isinstance(norm, float) and norm == pytest.approx(5.0) and not torch.equal(model.weight, before)


def test_a_warning_raised_at_every_step_still_shows_once():
    """Python shows a warning once per place by default, also when it is raised at every optimiser step (a
    catch_warnings block left at every step would reset that)."""
    from deformable_detr.engine.checkpoints import TrainState

    model, step = linear_step()
    state = TrainState()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            warnings.warn("a warning of every step", UserWarning, stacklevel=1)
            model.weight.grad, model.bias.grad = torch.ones(1, 2), torch.zeros(1)
            step.optimiser_step(state, torch.tensor(1.0))
    assert sum("every step" in str(w.message) for w in caught) == 1


def test_fine_tuning_starts_from_the_papers_coco_model_by_default(shapes_folder, tmp_path, hub):
    """No --model_name_or_path or --config_name: the run fine-tunes SenseTime/deformable-detr from the Hub (here
    the fake one, serving transformers' format), with fresh class heads for the data's classes."""
    from tests.support.fake_hub import hub_env
    from tests.support.processes import run_command

    expected = serve_transformers_checkpoint(hub, "SenseTime/deformable-detr", tmp_path / "hf")
    out = tmp_path / "run"
    arguments = ["--dataset", shapes_folder, "--output_dir", out, "--max_steps", "1", "--eval_every_epochs", "0"]
    arguments += ["--image_size", "64", "--max_image_size", "96", "--num_workers", "0"]
    arguments += ["--learning_rate", "0", "--backbone_learning_rate", "0"]  # the weights stay the downloaded ones
    script = "import sys; from deformable_detr.apps.cli import train_main; train_main(sys.argv[1:])"
    run_command([sys.executable, "-c", script, *arguments], env=hub_env(hub.endpoint, tmp_path / "home"))
    model = DeformableDetrForObjectDetection.from_pretrained(out)
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    trained = model.state_dict()
    assert trained["class_embed.weight"].shape == (3, 64) and expected["class_embed.weight"].shape == (91, 64)
    for name, tensor in expected.items():
        if "class_embed" not in name:
            assert torch.equal(trained[name], tensor), name
    assert "--model_name_or_path SenseTime/deformable-detr" in open(out / "README.md").read()


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "no answer"])
def test_the_default_model_offline_is_one_line_naming_config_name(shapes_folder, tmp_path, monkeypatch, offline):
    """Offline, or with a Hub that does not answer, the default model fails at once in one line that names
    --config_name, not after half a minute of retries."""
    from huggingface_hub import constants

    from tests.support.processes import free_port

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    if offline:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        why = r"offline mode \(HF_HUB_OFFLINE\) is on"
    else:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
        why = r"the Hub \(http://127.0.0.1:\d+\) cannot be reached \(\w+\)"
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        train_main(["--dataset", shapes_folder, "--output_dir", str(tmp_path / "run")])
    message = str(stopped.value)
    assert time.monotonic() - started < 5
    assert re.fullmatch(
        f"deformable-detr-train: error: model_name_or_path SenseTime/deformable-detr: {why}, and the model is not "
        r"in the local cache; .*--config_name tiny \(or paper\)",
        message,
    ), message


def test_a_fresh_model_on_few_images_is_warned_of(shapes_folder, tmp_path):
    train(options(shapes_folder, tmp_path, max_steps=1, eval_every_epochs=0))
    log = open(tmp_path / "train.log").read()
    assert (
        "WARNING a fresh model (--config_name tiny) starts from random weights: on 6 training images its mAP will "
        "most likely stay low (near 0 on real photos: "
    ) in log
    assert "leave out --config_name to start from SenseTime/deformable-detr (COCO), or give --model_name_or_path" in log


def test_device_places_the_run_and_one_this_torch_cannot_use_is_named(shapes_folder, tmp_path):
    """--device cpu trains there; a device this torch cannot use fails at once, naming it."""
    train(options(shapes_folder, tmp_path / "cpu", max_steps=1, eval_every_epochs=0, device="cpu"))
    assert "on 1 process(es) (cpu)" in open(tmp_path / "cpu" / "train.log").read()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda:1': CUDA is not available here \(torch "):
            options(shapes_folder, tmp_path / "gpu", device="cuda:1")
    with pytest.raises(ValueError, match=r"^device 'tpu0' is not a torch device \(such as cpu, cuda or cuda:1\)"):
        options(shapes_folder, tmp_path / "bad", device="tpu0")
    command = ["--dataset", shapes_folder, "--config_name", "tiny", "--device", "tpu0"]
    with pytest.raises(SystemExit, match="^deformable-detr-train: error: device 'tpu0' is not a torch device"):
        train_main(command + ["--output_dir", str(tmp_path / "cli")])


def test_device_under_a_launcher_of_several_processes_is_refused(monkeypatch):
    from deformable_detr.engine.trainer import process_state

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^device 'cpu': the launcher places each of the 2 processes on its own"):
        process_state("cpu")


def test_a_checkpoint_folder_is_a_model_that_detect_and_evaluate_load(shapes_folder, tmp_path, capsys):
    """checkpoint-N/ holds config.json and preprocessor_config.json beside accelerate's state: detect and evaluate
    load it as a saved model."""
    from deformable_detr.apps.detect import load_detector

    train(options(shapes_folder, tmp_path, max_steps=2, checkpointing_steps=1, eval_every_epochs=0))
    checkpoint = tmp_path / "checkpoint-1"
    assert {"config.json", "preprocessor_config.json", "model.safetensors", "trainer_state.json"} <= set(
        os.listdir(checkpoint)
    )
    model, processor = load_detector(str(checkpoint), "cpu")
    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)
    assert model.config.id2label == dict(enumerate(CLASS_NAMES))
    assert processor.size == {"shortest_edge": 64, "longest_edge": 96}
    evaluate_main(["--model", str(checkpoint), "--dataset", shapes_folder, "--output", str(tmp_path / "m.json")])
    assert json.load(open(tmp_path / "m.json"))["map"] >= 0


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "redirected"])
def test_log_lines_are_not_glued_to_the_bars_nor_redirected_logs_full_of_cursor_moves(
    shapes_folder, tmp_path, monkeypatch, terminal
):
    """On a terminal, log lines start lines of their own, not glued to the bar ('lr=2.0e-04]21:39:07 INFO step
    10'); redirected, no nested evaluation bar moves the cursor ('\\x1b[A'); transformers' 'Writing model shards'
    bars stay hidden."""
    stderr = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    train(options(shapes_folder, tmp_path, max_steps=3, load_best_model_at_end=True))
    shown = stderr.getvalue()
    assert re.search(r"(^|[\r\n])\d\d:\d\d:\d\d INFO step 3, epoch 1", shown), shown
    assert not re.search(r"[^\r\n]\d\d:\d\d:\d\d (INFO|WARNING)", shown), shown
    assert "Writing model shards" not in shown and "Loading weights" not in shown
    assert ("training:" in shown) == terminal and ("\x1b[A" in shown) == terminal  # nested bars on a terminal only


def test_the_model_card_counts_in_words_and_times_short_runs_in_seconds(tmp_path):
    """'1 class', '1 process' and seconds for a short run (not '1 classes', '1 process(es)', '0.0 minutes')."""
    from deformable_detr import DeformableDetrConfig
    from deformable_detr.engine.model_card import duration, write_model_card

    config = DeformableDetrConfig(id2label={0: "circle"}, label2id={"circle": 0})
    fields = dict(dataset="data", command="c", steps=1, skipped_steps=1, seconds=12.3, processes=1, model_id="m")
    card = open(write_model_card(str(tmp_path), config, None, **fields)).read()
    assert "to detect 1 class: circle." in card
    assert "\n1 optimiser step in 12 seconds on 1 process, 1 step skipped for a non-finite loss or gradient." in card
    assert [duration(s) for s in (0.4, 1, 42, 60, 90, 3600, 7200)] == [
        "0 seconds",
        "1 second",
        "42 seconds",
        "1 minute",
        "1.5 minutes",
        "60 minutes",
        "2.0 hours",
    ]
