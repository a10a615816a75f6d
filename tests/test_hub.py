"""Save / load round trips, the Auto classes, and trust_remote_code loading without our package."""

import json
import os
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor
from tests.support.models import tiny_model
from tests.support.processes import run_command

# exactly the files a saved model holds: the model's code (deformable_detr/model/, the Hub set), never the
# converters, the test oracle (deformable_detr/testing.py) or training code
CODE_FILES = {
    "gradient_checkpointing.py",
    "transformers_mapping.py",
    "configuration_deformable_detr.py",
    "modeling_deformable_detr.py",
    "backbone.py",
    "position_encoding.py",
    "deformable_transformer.py",
    "ms_deform_attn.py",
    "ms_deform_attn_cpu.py",
    "ms_deform_attn_inputs.py",
    "ms_deform_attn_triton.py",
    "loss_deformable_detr.py",
    "box_ops.py",
}


def test_the_hub_set_is_the_model_folder():
    """What a saved model and its processor hold is deformable_detr/model/, file for file: nothing else is copied."""
    import deformable_detr.model

    folder = os.path.dirname(deformable_detr.model.__file__)
    here = {name for name in os.listdir(folder) if name.endswith(".py")}
    assert here == CODE_FILES | {"image_processing_deformable_detr.py", "__init__.py"}


def outputs(model, seed=0):
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    return out.logits, out.pred_boxes


@pytest.mark.parametrize(
    "variant",
    [
        {},
        dict(with_box_refine=True),
        dict(with_box_refine=True, two_stage=True),
        dict(d_model=256, encoder_ffn_dim=1024, encoder_layers=6, decoder_layers=6),
    ],
)
def test_save_and_load_give_identical_outputs(tmp_path, variant):
    model = tiny_model(**variant)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert files == {"model.safetensors", "config.json"} | CODE_FILES
    assert not any(f.endswith(".bin") for f in files)
    loaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path).eval()
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_shared_heads_are_saved_once_and_stay_shared(tmp_path):
    from safetensors import safe_open

    model = tiny_model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        head_keys = sorted(k for k in f.keys() if "class_embed" in k)
    assert head_keys == ["class_embed.bias", "class_embed.weight"]
    loaded = DeformableDetrForObjectDetection.from_pretrained(tmp_path)
    assert loaded.class_head(0) is loaded.class_head(1) and loaded.box_head(0) is loaded.box_head(1)


def test_auto_classes_resolve_to_ours(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is DeformableDetrConfig and config.model_type != "deformable_detr"
    loaded = AutoModelForObjectDetection.from_pretrained(tmp_path)
    assert type(loaded) is DeformableDetrForObjectDetection
    DeformableDetrImageProcessor().save_pretrained(tmp_path)
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is DeformableDetrImageProcessor
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForObjectDetection"] == "modeling_deformable_detr.DeformableDetrForObjectDetection"


REMOTE_SCRIPT = """
import sys
# neither our package nor the training-only dependencies may be needed
for name in ("deformable_detr", "scipy", "accelerate", "datasets", "pycocotools"):
    sys.modules[name] = None
import torch
from transformers import AutoModelForObjectDetection
model = AutoModelForObjectDetection.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model(x)
torch.save({"logits": out.logits, "pred_boxes": out.pred_boxes}, sys.argv[2])
"""


def test_remote_code_loads_where_our_package_is_missing(tmp_path):
    model = tiny_model(with_box_refine=True)
    model.save_pretrained(tmp_path / "saved")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    run_command(
        [sys.executable, "-c", textwrap.dedent(REMOTE_SCRIPT), tmp_path / "saved", tmp_path / "out.pt"],
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    remote = torch.load(tmp_path / "out.pt")
    logits, boxes = outputs(model)
    assert torch.equal(remote["logits"], logits) and torch.equal(remote["pred_boxes"], boxes)
