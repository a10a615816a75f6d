"""Loading a saved model for detection or evaluation: what cannot be loaded is named, nothing fails deep inside."""

import json

import pytest
import torch
from transformers import PretrainedConfig

from deformable_detr.apps.cli import detect_main
from deformable_detr.weights.loading import load_model
from tests.support.bccd import BCCD
from tests.support.models import tiny_model


def never_ask_the_hub(monkeypatch):
    def asked(source, *args, **kwargs):
        pytest.fail(f"the Hub was asked for {source} (a minute of retries offline)")

    monkeypatch.setattr(PretrainedConfig, "get_config_dict", asked)


def test_a_missing_folder_is_named_without_asking_the_hub(tmp_path, monkeypatch):
    never_ask_the_hub(monkeypatch)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match=f"^model {missing}: no such folder$"):
        load_model(missing)
    with pytest.raises(SystemExit, match="^deformable-detr-detect: error: model .*no-such-model: no such folder"):
        detect_main([str(BCCD / "JPEGImages" / "BloodImage_00000.jpg"), "--model", missing])


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    never_ask_the_hub(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"^model runs/mdoel: no such folder; did you mean runs/model\?$"):
        load_model("runs/mdoel")


def test_a_hub_id_not_on_the_hub_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no retries against an unreachable Hub
    with pytest.raises(FileNotFoundError, match="^model someone/no-such-model: no such folder here, and no model on"):
        load_model("someone/no-such-model")


def test_corrupt_weights_name_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 20)
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read"):
        load_model(str(tmp_path))


def test_weights_holding_nan_are_refused_naming_the_parameter(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.class_embed.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="the weights class_embed.weight hold NaN or infinity"):
        load_model(str(tmp_path))


def test_a_folder_without_config_json_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such file"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"decoder_layers": 3}, r"missing keys \['model\.decoder\.layers\.2\."),
        ({"decoder_layers": 1}, r"unexpected keys \['model\.decoder\.layers\.1\."),
        (
            {"num_labels": 5, "id2label": {str(i): str(i) for i in range(5)}},
            r"class_embed\.bias is \(3,\) in the weights",
        ),
    ],
)
def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, edit, message):
    """An edited config.json whose layers the weights lack (or hold in other sizes) is refused, naming them: they
    would be left at random."""
    tiny_model().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | edit))
    with pytest.raises(ValueError, match="the weights do not fit its config.json: " + message):
        load_model(str(tmp_path))
