"""Export to transformers' own format (transformers_export.py, `deformable-detr-export --format transformers`): plain
transformers, where our package cannot be imported, loads the folder with no remote code and gives our outputs."""

import contextlib
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from deformable_detr import DeformableDetrImageProcessor
from deformable_detr.apps.cli import export_main
from deformable_detr.apps.onnx_export import _example_inputs, max_abs_difference
from deformable_detr.apps.transformers_export import TOLERANCE, to_transformers, transformers_config
from deformable_detr.testing import VARIANTS, perturb_, small_hf_config
from deformable_detr.weights.loading import load_model
from tests.support.models import saved_detector, tiny_model
from tests.support.processes import run_command

EXPORTED = {
    **VARIANTS,  # the parity tests' variants
    "resnet50, trained batch norms": {"backbone": "resnet50", "freeze_backbone_batch_norms": False},
    "transformers backbone": {"backbone_config": small_hf_config().backbone_config.to_dict()},
}

PLAIN_TRANSFORMERS = """
import sys
sys.modules["deformable_detr"] = None  # our package must not be needed
import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection, DeformableDetrForObjectDetection
results = {}
for folder in sys.argv[2:]:
    model = DeformableDetrForObjectDetection.from_pretrained(folder).eval()
    auto = AutoModelForObjectDetection.from_pretrained(folder)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(model).__module__.startswith("transformers.models.deformable_detr"), type(model).__module__
    assert type(auto) is type(model), type(auto)
    inputs = torch.load(folder + "/inputs.pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    results[folder] = {
        "logits": out.logits,
        "pred_boxes": out.pred_boxes,
        "processor": type(processor).__module__ + "." + type(processor).__name__,
        "pixel_values": processor(images=image, return_tensors="pt")["pixel_values"],
    }
torch.save(results, sys.argv[1])
"""


def test_every_variant_loads_in_plain_transformers_with_our_outputs(tmp_path):
    processor = DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 100})
    inputs = dict(zip(("pixel_values", "pixel_mask"), _example_inputs(2, (96, 128), padded=True)))
    folders, expected = {}, {}
    for variant, overrides in EXPORTED.items():
        model = perturb_(tiny_model(**overrides)).eval()  # no zero or identity initialisation hides a mistake
        folder = str(tmp_path / variant.replace(" ", "_").replace(",", ""))
        trained_norms = not model.config.freeze_backbone_batch_norms
        with pytest.warns(UserWarning, match="always freezes") if trained_norms else contextlib.nullcontext():
            to_transformers(model, folder, processor)
        torch.save(inputs, os.path.join(folder, "inputs.pt"))
        with torch.no_grad():
            expected[folder] = model(**inputs)
        folders[variant] = folder
        assert json.loads(open(os.path.join(folder, "config.json")).read())["model_type"] == "deformable_detr"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    script = [sys.executable, "-c", textwrap.dedent(PLAIN_TRANSFORMERS), tmp_path / "out.pt", *folders.values()]
    run_command(script, cwd=tmp_path, env=env, timeout=600)
    results = torch.load(tmp_path / "out.pt")
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ours_pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    for variant, folder in folders.items():
        theirs, mine = results[folder], expected[folder]
        difference = max(
            (theirs["logits"] - mine.logits).abs().max().item(),
            (theirs["pred_boxes"] - mine.pred_boxes).abs().max().item(),
        )
        print(f"{variant}: plain transformers vs ours, max abs difference {difference:.1e}")
        assert difference <= TOLERANCE, variant
        assert theirs["processor"].startswith("transformers.models.deformable_detr."), theirs["processor"]
        assert theirs["pixel_values"].shape == ours_pixels.shape
        assert (theirs["pixel_values"] - ours_pixels).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dilation": True}, r"^DC5 \(dilation=True\) cannot be exported to transformers' format: .* timm"),
        ({"class_cost": 1.5}, r"^class_cost=1.5: transformers' DeformableDetrConfig takes a whole number"),
    ],
)
def test_what_transformers_cannot_express_is_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        to_transformers(tiny_model(**overrides), str(tmp_path / "out"))
    assert not os.listdir(tmp_path)


def test_a_processor_setting_transformers_has_not_is_refused(tmp_path):
    processor = DeformableDetrImageProcessor(boxes_relative_to="image")
    with pytest.raises(ValueError, match="boxes_relative_to='image' cannot be exported"):
        to_transformers(tiny_model(), str(tmp_path / "out"), processor)
    assert not os.listdir(tmp_path)


def test_untied_heads_are_kept(tmp_path):
    """transformers ties every class_embed.i to class_embed.0 unless told not to: our per-layer heads would collapse."""
    assert transformers_config(tiny_model(with_box_refine=True)).tie_word_embeddings is False


def test_command_exports_a_saved_model(tmp_path, capsys):
    """And the export loads back into ours (load_model, as the commands do) with the saved model's outputs."""
    model, _ = saved_detector(tmp_path / "model")
    export_main(["--model", str(tmp_path / "model"), "--format", "transformers", "--output", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'hf'} written in" in out
    assert "transformers' model loaded from it vs ours, padded batch of 2" in out
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {"0": "RBC", "1": "WBC", "2": "Platelets"} and "auto_map" not in config
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "DeformableDetrImageProcessor" and "auto_map" not in processor
    back = load_model(str(tmp_path / "hf"))
    pixel_values, pixel_mask = _example_inputs(2, (96, 128), padded=True)
    with torch.no_grad():
        assert max_abs_difference(back(pixel_values, pixel_mask), model(pixel_values, pixel_mask)) <= TOLERANCE
    with pytest.raises(SystemExit, match="is not an empty folder"):
        export_main(["--model", str(tmp_path / "model"), "--format", "transformers", "--output", str(tmp_path / "hf")])
    with pytest.raises(SystemExit):
        export_main(["--model", "m", "--format", "transformers", "--output", "o", "--opset", "17"])
    assert "--opset is for --format onnx" in capsys.readouterr().err
