"""Pushing to the Hub and loading back, against the local fake Hub (tests/support/fake_hub.py): from the training
script and from the API. Clients run in subprocesses, since huggingface_hub reads HF_ENDPOINT when it is imported."""

import json
import sys

import pytest
import torch

from deformable_detr import DeformableDetrForObjectDetection, DeformableDetrImageProcessor
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from tests.support.fake_hub import hub_env
from tests.support.models import TINY_OVERRIDES
from tests.support.processes import free_port, run_command

# loads a repo where only transformers is installed, and prints the outputs on an image as JSON
LOAD_REMOTE = """
import json, sys
for name in ("deformable_detr", "scipy", "accelerate", "datasets", "pycocotools"):
    sys.modules[name] = None
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline
model = AutoModelForObjectDetection.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model)
image = Image.open(sys.argv[2])
with torch.no_grad():
    out = model(**processor(image, return_tensors="pt"))
detector = pipeline("object-detection", model=sys.argv[1], trust_remote_code=True)
print(json.dumps({"logits": out.logits.tolist(), "boxes": out.pred_boxes.tolist(),
                  "detections": detector(image, threshold=0.0)[:5]}))
"""


def run(hub, home, command, cwd=None):
    """Runs `command` against `hub`, with its Hub cache in `home` and without our checkout on PYTHONPATH: its stdout."""
    return run_command(command, env=hub_env(hub.endpoint, home) | {"PYTHONPATH": ""}, cwd=cwd, timeout=300).stdout


def local_outputs(folder, image_path):
    from PIL import Image

    model = DeformableDetrForObjectDetection.from_pretrained(folder).eval()
    processor = DeformableDetrImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        out = model(**processor(Image.open(image_path), return_tensors="pt"))
    return out.logits, out.pred_boxes


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "shapes.png"
    shapes_dataset(1, 96, seed=9)[0]["image"].save(path)
    return str(path)


def check_remote_load(hub, tmp_path, repo_id, local_folder, image):
    loaded = json.loads(
        run(hub, tmp_path / "clean", [sys.executable, "-c", LOAD_REMOTE, repo_id, image], cwd=tmp_path).splitlines()[-1]
    )
    logits, boxes = local_outputs(local_folder, image)
    assert torch.equal(torch.tensor(loaded["logits"]), logits)
    assert torch.equal(torch.tensor(loaded["boxes"]), boxes)
    assert len(loaded["detections"]) == 5 and loaded["detections"][0]["label"] in CLASS_NAMES


def test_training_script_pushes_and_the_repo_loads_anywhere(tmp_path, image, shapes_coco, hub):
    data = shapes_coco(4, 2)
    output_dir = tmp_path / "run"
    run(
        hub,
        tmp_path / "home",
        [
            sys.executable,
            "-m",
            "deformable_detr",
            "train",
            "--dataset",
            data,
            "--output_dir",
            str(output_dir),
            "--config_name",
            "tiny",
            "--config_overrides",
            TINY_OVERRIDES,
            "--image_size",
            "64",
            "--max_image_size",
            "96",
            "--max_steps",
            "2",
            "--num_workers",
            "0",
            "--checkpointing_steps",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "shapes-detr",  # no namespace: the Hub puts it under the token's user
            "--hub_token",
            "hf_given_token",
            "--hub_private_repo",
        ],
    )
    files = hub.files("user/shapes-detr")
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "eval_results.json",
        "modeling_deformable_detr.py",
        "image_processing_deformable_detr.py",
    } <= set(files)
    assert (output_dir / "best" / "model.safetensors").exists()  # kept locally, not uploaded
    assert not any(name.startswith(("checkpoint-", "best/", "best.partial/")) for name in files)
    assert files["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
    assert "hf_given_token" in hub.tokens
    assert "mAP@[.5:.95]" in files["README.md"].decode()
    assert 'model="user/shapes-detr"' in files["README.md"].decode()  # the card's example names the repo as pushed
    assert "hf_given_token" not in files["README.md"].decode()  # the command in the card hides it
    check_remote_load(hub, tmp_path, "user/shapes-detr", output_dir, image)


PUSH_API = """
import sys
from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor
config = DeformableDetrConfig(backbone="resnet18", d_model=32, encoder_layers=1, decoder_layers=1, num_queries=10,
                              encoder_attention_heads=2, decoder_attention_heads=2, num_labels=3,
                              id2label=dict(enumerate(["circle", "square", "triangle"])))
model = DeformableDetrForObjectDetection(config)
processor = DeformableDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 128})
model.push_to_hub("user/api-detr")
processor.push_to_hub("user/api-detr")
model.save_pretrained(sys.argv[1])
processor.save_pretrained(sys.argv[1])
"""


def test_push_to_hub_from_the_api(tmp_path, image, hub):
    run(hub, tmp_path / "home", [sys.executable, "-c", PUSH_API, str(tmp_path / "local")], cwd="/")
    files = hub.files("user/api-detr")
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "configuration_deformable_detr.py",
        "modeling_deformable_detr.py",
        "ms_deform_attn.py",
        "image_processing_deformable_detr.py",
    } <= set(files)
    check_remote_load(hub, tmp_path, "user/api-detr", tmp_path / "local", image)


def test_an_unreachable_hub_stops_the_run_before_training(tmp_path, shapes_coco):
    """--push_to_hub creates the repo first: a missing token or network stops the command with one line before a
    step is taken, not after hours of training."""
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    command = [sys.executable, "-m", "deformable_detr", "train", "--dataset", shapes_coco(4, 2)]
    command += ["--output_dir", tmp_path / "run", "--config_name", "tiny", "--max_steps", "1"]
    command += ["--push_to_hub", "--hub_model_id", "user/never"]
    result = run_command(command, env=hub_env(nowhere, tmp_path / "home"), timeout=300, returncode=1)
    assert "push_to_hub: the Hub repo 'user/never' cannot be created or reached (ConnectError" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "model.safetensors").exists()
