import os

import pytest

from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.metrics.evaluation import SUMMARY_NAMES, coco_ground_truth, coco_metrics, format_metrics
from deformable_detr.testing import synthetic_coco


@pytest.fixture(scope="module")
def ground_truth():
    return coco_ground_truth(shapes_dataset(6, 96, seed=4), CLASS_NAMES + ["hexagon"])


def detections_from(ground_truth, shift=0.0, score=0.9):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "score": score,
            "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], a["bbox"][2], a["bbox"][3]],
        }
        for a in ground_truth["annotations"]
    ]


def test_perfect_detections(ground_truth):
    metrics = coco_metrics(ground_truth, detections_from(ground_truth))
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["mar_100"] == pytest.approx(1.0)
    for name in CLASS_NAMES:
        assert metrics["per_class"][name]["ap"] == pytest.approx(1.0)
        assert metrics["per_class"][name]["objects"] > 0
    assert metrics["per_class"]["hexagon"] == {"ap": None, "ap_50": None, "objects": 0}
    assert metrics["map_large"] == -1  # no object above 96^2 pixels
    table = format_metrics(metrics)
    assert "hexagon" in table and "n/a" in table and "1.000" in table
    # a class name with a line break keeps its row on one line
    odd = metrics | {"per_class": {"red\ncircle": metrics["per_class"]["circle"]}}
    assert format_metrics(odd).splitlines()[-1].startswith("red\\ncircle ")


def test_shifted_boxes_score_by_iou(ground_truth):
    """Boxes shifted by 0.2 of their width have IoU 0.8 / 1.2 = 0.667: right at the thresholds 0.50..0.65
    (4 of the 10), wrong above."""
    metrics = coco_metrics(ground_truth, detections_from(ground_truth, shift=0.2))
    assert metrics["map_50"] == pytest.approx(1.0)
    assert metrics["map_75"] == pytest.approx(0.0)
    assert metrics["map"] == pytest.approx(0.4)


def test_wrong_class_and_no_detections(ground_truth):
    wrong = [d | {"category_id": (d["category_id"] + 1) % 3} for d in detections_from(ground_truth)]
    assert coco_metrics(ground_truth, wrong)["map"] == pytest.approx(0.0)
    empty = coco_metrics(ground_truth, [])
    assert empty["map"] == 0.0 and empty["per_class"]["circle"]["ap"] == 0.0
    assert empty["map_large"] == empty["mar_large"] == -1  # as pycocotools says when detections exist
    assert set(empty) == set(coco_metrics(ground_truth, detections_from(ground_truth)))


def test_faster_coco_eval_gives_pycocotools_numbers():
    """Where faster-coco-eval is installed the evaluation uses it: the same twelve numbers and per-class AP."""
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed")
    gt, detections = synthetic_coco(images=200, detections_per_image=20, classes=3, seed=1)
    faster, reference = (coco_metrics(gt, detections, tools) for tools in ("faster-coco-eval", "pycocotools"))
    for name in SUMMARY_NAMES:
        assert faster[name] == pytest.approx(reference[name], abs=1e-4), name
    for name in reference["per_class"]:
        assert faster["per_class"][name]["ap"] == pytest.approx(reference["per_class"][name]["ap"], abs=1e-4)
    assert reference["map"] > 0.02  # not all noise: the comparison means something


def test_an_output_that_cannot_be_written_fails_before_the_evaluation(tmp_path, monkeypatch):
    """An --output that cannot be written is an error before the model and the data are read, not after the
    whole evaluation."""
    from deformable_detr.apps.evaluate import evaluate_saved_model

    monkeypatch.setattr("accelerate.Accelerator", lambda *a, **k: pytest.fail("the evaluation started"))
    (tmp_path / "results").mkdir()
    with pytest.raises(ValueError, match="output .*results' is a folder; give the path of a JSON file"):
        evaluate_saved_model("model", "data", output=str(tmp_path / "results"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError):
        evaluate_saved_model("model", "data", output=str(tmp_path / "a_file" / "m.json"))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs a folder that even root cannot write in: /proc")
def test_a_folder_that_cannot_be_written_in_fails_before_the_evaluation(monkeypatch):
    """The folder exists, but no file can be made in it (as a read-only folder for other users; the tests may run
    as root, for whom only such a file system refuses): an error naming the file before the evaluation starts."""
    from deformable_detr.apps.evaluate import evaluate_saved_model

    monkeypatch.setattr("accelerate.Accelerator", lambda *a, **k: pytest.fail("the evaluation started"))
    with pytest.raises(OSError, match="^/proc/metrics.json cannot be written"):
        evaluate_saved_model("model", "data", output="/proc/metrics.json")


def saved_bccd_model(folder):
    """A tiny model with the vendored BCCD's classes (in the loader's order), for small images."""
    from deformable_detr import DeformableDetrImageProcessor
    from tests.support.models import tiny_model

    tiny_model(id2label={0: "Platelets", 1: "RBC", 2: "WBC"}).save_pretrained(folder)
    DeformableDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(folder)


def test_the_table_is_printed_before_the_json_is_written(tmp_path, monkeypatch, capsys):
    """The metrics table is printed before the JSON is written: a JSON path that cannot be written at the end (its
    folder turned into a file during the evaluation) is an error after the table is on screen."""
    from deformable_detr.apps import evaluate
    from deformable_detr.apps.cli import evaluate_main
    from tests.support.bccd import BCCD

    score = evaluate.coco_metrics

    def and_then_the_folder_becomes_a_file(*args, **kwargs):
        metrics = score(*args, **kwargs)
        (tmp_path / "results").rmdir()
        (tmp_path / "results").write_text("")
        return metrics

    saved_bccd_model(tmp_path / "model")
    monkeypatch.setattr(evaluate, "coco_metrics", and_then_the_folder_becomes_a_file)
    output = tmp_path / "results" / "m.json"
    command = ["--model", str(tmp_path / "model"), "--dataset", str(BCCD), "--split", "test", "--output", str(output)]
    command += ["--output_dir", str(tmp_path / "pictures")]
    with pytest.raises(SystemExit, match=f"^deformable-detr-evaluate: error: {output} cannot be written"):
        evaluate_main(command)
    printed = capsys.readouterr().out
    assert "mAP" in printed and "Platelets" in printed


def test_evaluate_writes_the_pictures_beside_the_metrics(tmp_path, capsys):
    """--output's folder gets the precision-recall curves and the confusion matrix, with their numbers: each of
    the BCCD test split's objects is found or missed once (a row of the matrix per true class)."""
    import json

    from PIL import Image

    from deformable_detr.apps.cli import evaluate_main
    from tests.support.bccd import BCCD

    saved_bccd_model(tmp_path / "model")
    output = tmp_path / "results" / "metrics.json"
    evaluate_main(
        ["--model", str(tmp_path / "model"), "--dataset", str(BCCD), "--split", "test"] + ["--output", str(output)]
    )
    assert f"confusion matrix written to {tmp_path / 'results'}" in capsys.readouterr().out
    for name in ("precision_recall.png", "confusion_matrix.png"):
        with Image.open(tmp_path / "results" / name) as picture:
            assert picture.format == "PNG"
    counts = json.loads((tmp_path / "results" / "confusion_matrix.json").read_text())
    assert counts["classes"] == ["Platelets", "RBC", "WBC", "background"]
    objects = json.loads(output.read_text())["per_class"]
    assert [sum(row) for row in counts["counts"][:3]] == [objects[name]["objects"] for name in counts["classes"][:3]]
    curves = json.loads((tmp_path / "results" / "precision_recall.json").read_text())
    assert set(curves) == {"recall", "iou=0.50", "iou=0.50:0.95"} and len(curves["iou=0.50"]["RBC"]) == 101
