"""pipeline("object-detection") with a saved model and processor, here and where our package is missing."""

import json
import os
import sys
import textwrap

import torch
from transformers import pipeline

from tests.support.bccd import BCCD, bccd_example
from tests.support.models import saved_detector
from tests.support.processes import run_command

IMAGE = str(BCCD / "JPEGImages" / "BloodImage_00000.jpg")


def direct_detections(model, processor, threshold):
    image, _ = bccd_example("BloodImage_00000")
    inputs = processor(image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    found = processor.post_process_object_detection(outputs, threshold, target_sizes=[(image.height, image.width)])[0]
    return [
        {"score": s, "label": model.config.id2label[label], "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), b))}
        for s, label, b in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].int().tolist())
    ]


def test_pipeline_gives_the_same_detections_as_model_and_processor(tmp_path):
    model, processor = saved_detector(tmp_path)
    detector = pipeline("object-detection", model=str(tmp_path), trust_remote_code=True)
    threshold = 0.01  # an untrained model: low scores, but many of them to compare
    found = detector(IMAGE, threshold=threshold)
    expected = direct_detections(model, processor, threshold)
    assert len(expected) > 3
    assert [d["label"] for d in found] == [d["label"] for d in expected]
    assert [d["box"] for d in found] == [d["box"] for d in expected]
    assert all(abs(a["score"] - b["score"]) < 1e-6 for a, b in zip(found, expected))


SCRIPT = """
import json, sys
for name in ("deformable_detr", "scipy", "accelerate", "datasets", "pycocotools"):
    sys.modules[name] = None
from transformers import pipeline
detector = pipeline("object-detection", model=sys.argv[1], trust_remote_code=True)
assert type(detector.model).__module__.startswith("transformers_modules")
assert type(detector.image_processor).__module__.startswith("transformers_modules")
print(json.dumps(detector(sys.argv[2], threshold=0.01)))
"""


def test_pipeline_with_remote_code_where_our_package_is_missing(tmp_path):
    model, processor = saved_detector(tmp_path / "saved")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = run_command(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), tmp_path / "saved", IMAGE], cwd=tmp_path, env=env, timeout=300
    )
    found = json.loads(result.stdout.strip().splitlines()[-1])
    expected = direct_detections(model, processor, 0.01)
    assert [(d["label"], d["box"]) for d in found] == [(d["label"], d["box"]) for d in expected]
