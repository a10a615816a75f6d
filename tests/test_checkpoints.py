"""Checkpoints: the marker of a complete one is written atomically, a half-written one is ignored, named, and
nothing in a checkpoint folder is unpickled as code."""

import json
import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from deformable_detr.engine.checkpoints import (
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

MODEL = {"d_model": 32, "dropout": 0.1, "bbox_loss_coefficient": 5.0}
SETUP = {"class_names": ["circle", "square"], "model": MODEL, "dataset": "data/shapes", "images_per_step": 8}


class FakeAccelerator:
    """What save_checkpoint uses of accelerate's Accelerator: one main process that writes a state folder."""

    is_main_process = True
    process_index = 0

    def save_state(self, folder):
        os.makedirs(folder)

    def load_state(self, folder):
        self.loaded = folder

    def wait_for_everyone(self):
        pass


def test_the_state_file_is_written_whole(tmp_path):
    state = TrainState(global_step=3, epoch=1, history=[{"step": 3, "loss": 1.5}])
    folder = save_checkpoint(FakeAccelerator(), str(tmp_path), state, keep=2)
    assert sorted(os.listdir(folder)) == [STATE_FILE]  # no temporary file left beside it
    assert TrainState(**json.load(open(os.path.join(folder, STATE_FILE)))) == state


def test_a_half_written_checkpoint_is_ignored_and_named(tmp_path, caplog, monkeypatch):
    """A disk that filled while checkpoint-4 was written left an empty trainer_state.json: `latest` resumes from
    checkpoint-2, with a warning naming checkpoint-4; asked for by name, it is refused."""
    monkeypatch.setattr(logging.getLogger("deformable_detr"), "propagate", True)  # a training run may have unset it
    save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=2), keep=5)
    os.makedirs(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / STATE_FILE).write_text("")
    with caplog.at_level(logging.WARNING, logger="deformable_detr"):
        assert find_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-4 is incomplete" in caplog.text
    with pytest.raises(FileNotFoundError, match="checkpoint-4: not a complete checkpoint"):
        find_checkpoint(str(tmp_path / "checkpoint-4"), str(tmp_path))
    (tmp_path / "checkpoint-2" / STATE_FILE).write_text('{"global_step": ')
    assert list_checkpoints(str(tmp_path)) == []  # nothing complete: a fresh start is not refused
    # a field of the wrong type: named, not a TypeError deep inside the resumed run
    (tmp_path / "checkpoint-2" / STATE_FILE).write_text('{"global_step": "9"}')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deformable_detr"):
        assert list_checkpoints(str(tmp_path)) == []
    assert "checkpoint-2 is incomplete (trainer_state.json: global_step is '9')" in caplog.text


def test_half_written_checkpoints_older_than_a_new_one_are_removed(tmp_path):
    """A checkpoint-2 without its marker (left by a crash or a second Ctrl-C) is deleted by the next checkpoint's
    rotation; a newer incomplete one is left alone."""
    os.makedirs(tmp_path / "checkpoint-2")
    os.makedirs(tmp_path / "checkpoint-9")  # newer than the one written now: not this run's to judge
    save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=4), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-9"]


def test_a_checkpoint_written_again_is_incomplete_until_it_is_done(tmp_path):
    """A signal in a step that had just written its checkpoint writes it again: the old marker is removed first, so
    a crash during the rewrite leaves an incomplete checkpoint, not a torn one taken for complete."""
    save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=3), keep=2)

    class Crashing(FakeAccelerator):
        def save_state(self, folder):
            raise KeyboardInterrupt  # a second Ctrl-C, or kill, halfway through the weights

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Crashing(), str(tmp_path), TrainState(global_step=3), keep=2)
    assert list_checkpoints(str(tmp_path)) == []


class MakesAFolder:
    """Unpickling this runs os.mkdir(path): the code a hostile checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_objects_in_a_checkpoint_are_refused_not_run(tmp_path):
    folder = save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=2, setup=SETUP), keep=1)
    hostile = pickle.dumps(MakesAFolder(str(tmp_path / "ran")), protocol=2)
    (tmp_path / "checkpoint-2" / "custom_checkpoint_0.pkl").write_bytes(hostile)
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl: a pickled object, which loading would run"):
        load_checkpoint(FakeAccelerator(), folder, SETUP)
    os.remove(tmp_path / "checkpoint-2" / "custom_checkpoint_0.pkl")
    (tmp_path / "checkpoint-2" / "random_states_0.pkl").write_bytes(hostile)
    with pytest.warns(UserWarning, match="random_states_0.pkl cannot be read safely .*not repeat an uninterrupted"):
        assert load_checkpoint(FakeAccelerator(), folder, SETUP).global_step == 2
    assert not (tmp_path / "ran").exists()


def test_a_run_on_other_classes_is_not_resumed_and_other_batches_are_warned_of(tmp_path):
    """Other classes are refused; another dataset or batch layout (the epoch's position no longer matches) is warned
    of."""
    folder = save_checkpoint(
        FakeAccelerator(), str(tmp_path), TrainState(global_step=4, epoch=1, batches_in_epoch=2, setup=SETUP), keep=1
    )
    assert json.load(open(os.path.join(folder, STATE_FILE)))["setup"] == SETUP
    with pytest.raises(ValueError, match=r"is a run on the classes \['circle', 'square'\], the data has \['RBC'\]"):
        load_checkpoint(FakeAccelerator(), folder, SETUP | {"class_names": ["RBC"]})
    with pytest.warns(
        UserWarning, match="images per optimiser step 8, this run has 16: it resumes at batch 2 of epoch 2"
    ):
        state = load_checkpoint(FakeAccelerator(), folder, SETUP | {"images_per_step": 16})
    assert state.setup["images_per_step"] == 16  # the next checkpoint records this run's
    with pytest.warns(UserWarning, match="dataset 'data/shapes', this run has 'elsewhere'"):
        load_checkpoint(FakeAccelerator(), folder, SETUP | {"dataset": "elsewhere"})


def test_a_run_of_another_model_configuration_is_not_resumed(tmp_path):
    """A change that keeps the weights' shapes (dropout, a loss weight) is refused, naming the settings."""
    setup = SETUP
    folder = save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=4, setup=setup), keep=1)
    other = setup | {"model": {"d_model": 32, "dropout": 0.5, "bbox_loss_coefficient": 50.0}}
    with pytest.raises(ValueError, match="with bbox_loss_coefficient=5.0, dropout=0.1, this run's has "):
        load_checkpoint(FakeAccelerator(), folder, other)
    assert load_checkpoint(FakeAccelerator(), folder, setup).global_step == 4


def test_a_checkpoint_of_another_configuration_is_named(tmp_path):
    """model.safetensors is checked against the model's names and shapes before anything is loaded."""
    folder = save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=2, setup=SETUP), keep=1)
    save_file({"model.query_position_embeddings.weight": torch.zeros(10, 64)}, os.path.join(folder, MODEL_FILE))
    accelerator = FakeAccelerator()
    weights = {"model.query_position_embeddings.weight": torch.zeros(20, 64)}
    with pytest.raises(ValueError, match="holds a model of another configuration .*size mismatch for model.query"):
        load_checkpoint(accelerator, folder, SETUP, weights)
    assert not hasattr(accelerator, "loaded")
    shared = torch.zeros(10, 64)  # one tensor under two names, which the file holds once
    other = {"model.query_position_embeddings.weight": shared, "class_embed.weight": torch.zeros(3, 64)}
    with pytest.raises(ValueError, match=r"another configuration .*: missing class_embed.weight$"):
        load_checkpoint(accelerator, folder, SETUP, other)
    weights = {"model.query_position_embeddings.weight": shared, "model.tied.weight": shared}
    assert load_checkpoint(accelerator, folder, SETUP, weights).global_step == 2 and accelerator.loaded == folder


def test_a_damaged_checkpoint_is_named(tmp_path):
    """A file that cannot be read (a truncated optimizer.bin, say) is named with the folder and the reader's words."""
    folder = save_checkpoint(FakeAccelerator(), str(tmp_path), TrainState(global_step=2, setup=SETUP), keep=1)

    class Truncated(FakeAccelerator):
        def load_state(self, folder):
            raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    with pytest.raises(ValueError, match=r"checkpoint-2 cannot be read, a damaged checkpoint \(RuntimeError: Pytorch"):
        load_checkpoint(Truncated(), folder, SETUP)
