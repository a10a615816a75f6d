import json

import pytest
from PIL import Image

from deformable_detr.metrics.evaluation import coco_metrics
from deformable_detr.metrics.evaluation_plots import confusion_matrix, precision_recall, write_evaluation_pictures

CAT, DOG = 0, 1


def ground_truth_of(images: list[list[tuple]]) -> dict:
    """images: per image, its objects as (category, [x, y, w, h]) or (category, box, "crowd")."""
    annotations = [
        {"id": len(images) * 100 + i * 10 + j, "image_id": i, "category_id": o[0], "bbox": o[1]}
        | {"area": o[1][2] * o[1][3], "iscrowd": int(len(o) > 2)}
        for i, objects in enumerate(images)
        for j, o in enumerate(objects)
    ]
    categories = [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"}]
    return {"images": [{"id": i} for i in range(len(images))], "annotations": annotations, "categories": categories}


def detection(image_id, category, box, score):
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score}


A, B, C, D, E = [0, 0, 10, 10], [20, 20, 10, 10], [0, 0, 20, 20], [40, 40, 10, 10], [0, 0, 10, 10]
GROUND_TRUTH = ground_truth_of(
    [
        [(CAT, A), (DOG, B)],
        [(DOG, C), (CAT, D)],
        [(CAT, [0, 0, 50, 50], "crowd")],
        [(CAT, E)],
    ]
)
DETECTIONS = [
    detection(0, CAT, A, 0.9),  # cat as cat
    detection(0, CAT, B, 0.8),  # dog as cat
    detection(0, DOG, [50, 50, 10, 10], 0.7),  # no object as dog
    detection(0, CAT, A, 0.6),  # A again, taken: no object as cat
    detection(1, DOG, C, 0.3),  # below the score threshold: C is missed, as is D
    detection(2, CAT, [10, 10, 10, 10], 0.9),  # inside the crowd region: counted nowhere
    detection(2, DOG, [60, 60, 10, 10], 0.9),  # no object as dog
    detection(3, DOG, [1, 0, 10, 10], 0.95),  # IoU 0.82 with E and the higher score: takes it, cat as dog
    detection(3, CAT, E, 0.9),  # IoU 1 but E is taken (greedy by score): no object as cat
]


def test_the_confusion_matrix_counts_each_case():
    # rows: true cat, dog, background; columns: detected cat, dog, background (missed)
    assert confusion_matrix(GROUND_TRUTH, DETECTIONS).tolist() == [[1, 1, 1], [1, 0, 1], [2, 2, 0]]
    # at score >= 0.25, C is found as a dog; at IoU 0.9 the dog on E is no longer a match (E found as a cat)
    assert confusion_matrix(GROUND_TRUTH, DETECTIONS, score_threshold=0.25).tolist() == [
        [1, 1, 1],
        [1, 1, 0],
        [2, 2, 0],
    ]
    assert confusion_matrix(GROUND_TRUTH, DETECTIONS, iou_threshold=0.9).tolist() == [
        [2, 0, 1],
        [1, 0, 1],
        [1, 3, 0],
    ]
    assert confusion_matrix(GROUND_TRUTH, []).tolist() == [[0, 0, 3], [0, 0, 2], [0, 0, 0]]


def test_precision_recall_curves_are_cocoevals():
    """Two images with a cat and a dog each. Cats: both found with boxes shifted by 0.2 of their width (IoU 0.667,
    right at 4 of the 10 thresholds 0.5:0.95). Dogs: one found, below a false one: precision 1/2 up to recall 1/2."""
    truth = ground_truth_of([[(CAT, [0, 0, 10, 10]), (DOG, [30, 30, 10, 10])]] * 2)
    found = [detection(i, CAT, [2, 0, 10, 10], 0.9 - i / 10) for i in range(2)]
    found += [detection(0, DOG, [30, 30, 10, 10], 0.9), detection(1, DOG, [60, 60, 10, 10], 0.95)]
    curves = precision_recall(truth, found)
    assert curves["recall"][:3] == [0.0, 0.01, 0.02] and len(curves["recall"]) == 101
    assert curves["iou=0.50"]["cat"] == pytest.approx([1.0] * 101)
    assert curves["iou=0.50:0.95"]["cat"] == pytest.approx([0.4] * 101)
    assert curves["iou=0.50"]["dog"] == pytest.approx([0.5] * 51 + [0.0] * 50)
    per_class = coco_metrics(truth, found)["per_class"]  # the curves' means are the table's AP
    assert per_class["dog"]["ap_50"] == pytest.approx(sum(curves["iou=0.50"]["dog"]) / 101)
    assert per_class["cat"]["ap"] == pytest.approx(0.4)
    nothing = precision_recall(ground_truth_of([[(CAT, [0, 0, 10, 10])]]), [])
    assert nothing["iou=0.50"] == {"cat": [0.0] * 101, "dog": None}  # no dog: no curve


def test_the_pictures_and_their_numbers_are_written(tmp_path):
    paths = write_evaluation_pictures(GROUND_TRUTH, DETECTIONS, str(tmp_path / "pictures"))
    names = ["precision_recall.png", "precision_recall.json", "confusion_matrix.png", "confusion_matrix.json"]
    assert paths == [str(tmp_path / "pictures" / name) for name in names]
    for path in paths[::2]:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and picture.width > 300 and picture.height > 300
            assert len(set(picture.convert("L").getdata())) > 10  # something drawn, not one colour
    counts = json.loads((tmp_path / "pictures" / "confusion_matrix.json").read_text())
    assert counts["classes"] == ["cat", "dog", "background"]
    assert counts["counts"] == [[1, 1, 1], [1, 0, 1], [2, 2, 0]]
    assert (counts["iou_threshold"], counts["score_threshold"]) == (0.5, 0.5)
    curves = json.loads((tmp_path / "pictures" / "precision_recall.json").read_text())
    assert curves == json.loads(json.dumps(precision_recall(GROUND_TRUTH, DETECTIONS)))
    with pytest.raises(ValueError, match="score_threshold 1.5 must be in"):
        write_evaluation_pictures(GROUND_TRUTH, DETECTIONS, str(tmp_path), score_threshold=1.5)
