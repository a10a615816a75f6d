import os
import sys

from tests.support.processes import run_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_writes_everything_it_promises(tmp_path):
    """`make demo` in miniature: a few images, one epoch."""
    result = run_command(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "demo.py"),
            "--output_dir",
            str(tmp_path),
            "--train_images",
            "16",
            "--eval_images",
            "4",
            "--epochs",
            "1",
            "--image_size",
            "64",
        ],
        timeout=600,
    )
    for name in (
        "training.png",
        "test_results.json",
        "model/model.safetensors",
        "model/README.md",
        "detections/test_0.png",
        "detections/test_3.png",
        "data/dataset_dict.json",
    ):
        assert os.path.isfile(tmp_path / name), name
    for where in ("data", "model", "detections", "training.png", "test_results.json"):  # it says where things went
        assert os.path.join(str(tmp_path), where) in result.stdout, where
    assert "test mAP@[.5:.95]" in result.stdout
