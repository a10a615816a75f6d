"""The evaluation as pictures: a precision-recall curve per class (pycocotools' interpolated precision at IoU 0.5
and averaged over IoU 0.5:0.95) and a confusion matrix (classes and background, at an IoU and a score threshold),
each as a PNG with its numbers as JSON beside it. `deformable-detr-evaluate` and the end of training write them.
matplotlib is imported only to draw (its Figure alone, no pyplot: no window, no global backend)."""

import json
import os

import numpy as np

from ..utils.file_writing import replaced_when_done
from .evaluation import accumulated_evaluation

PR_IOUS = {"iou=0.50": slice(0, 1), "iou=0.50:0.95": slice(None)}  # of COCOeval's 10 IoU thresholds
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs
BACKGROUND = "background"


def precision_recall(ground_truth: dict, detections: list[dict], tools: str = "auto") -> dict:
    """Per class, the precision at COCOeval's 101 recall points (all areas, up to 100 detections per image):
    `{"recall": [101], "iou=0.50": {name: [101] or None}, "iou=0.50:0.95": {...}}`, None for a class without
    objects, and the mean over IoU thresholds 0.5:0.95 for the latter."""
    names = [c["name"] for c in ground_truth["categories"]]
    if detections:
        precision = accumulated_evaluation(ground_truth, detections, tools).eval["precision"][:, :, :, 0, -1]
    else:  # nothing found: precision 0 at every recall of a class with objects (pycocotools loads no empty results)
        counted = {a["category_id"] for a in ground_truth["annotations"] if not a["iscrowd"]}
        precision = np.array([0.0 if c["id"] in counted else -1.0 for c in ground_truth["categories"]])
        precision = np.broadcast_to(precision, (10, len(RECALL_POINTS), len(names)))
    curves = {"recall": [round(float(r), 2) for r in RECALL_POINTS]}
    for key, ious in PR_IOUS.items():  # precision: (IoU thresholds, recall points, classes), -1 without objects
        curves[key] = {
            name: None if (precision[ious, :, k] < 0).any() else precision[ious, :, k].mean(0).tolist()
            for k, name in enumerate(names)
        }
    return curves


def confusion_matrix(
    ground_truth: dict, detections: list[dict], iou_threshold: float = 0.5, score_threshold: float = 0.5
) -> np.ndarray:
    """(classes + 1, classes + 1) counts: row = the object's true class, column = the detected class; the last row
    (background) counts detections of no object, the last column objects no detection found. Per image, the
    detections scoring at least `score_threshold` take, highest score first, the unmatched object of any class
    they overlap most, if at IoU >= `iou_threshold`. Crowd regions are no objects, and a detection inside one
    (intersection over the detection's area >= iou_threshold, as COCOeval has it) counts nowhere."""
    from pycocotools import mask

    background = len(ground_truth["categories"])
    row_of = {c["id"]: k for k, c in enumerate(ground_truth["categories"])}
    matrix = np.zeros((background + 1, background + 1), dtype=np.int64)
    objects, found = {}, {}
    for a in ground_truth["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    for d in detections:
        if d["score"] >= score_threshold:
            found.setdefault(d["image_id"], []).append(d)
    for image in ground_truth["images"]:
        truths = objects.get(image["id"], [])
        kept = sorted(found.get(image["id"], []), key=lambda d: -d["score"])
        crowd = [bool(t["iscrowd"]) for t in truths]
        ious = mask.iou([d["bbox"] for d in kept], [t["bbox"] for t in truths], crowd) if kept and truths else []
        taken = np.array(crowd, dtype=bool)  # crowd regions are never taken: a detection is no miss of them
        for i, d in enumerate(kept):
            overlaps = np.where(taken, -1.0, ious[i]) if truths else np.array([])
            best = int(overlaps.argmax()) if overlaps.size else -1
            if best >= 0 and overlaps[best] >= iou_threshold:
                taken[best] = True
                matrix[row_of[truths[best]["category_id"]], row_of[d["category_id"]]] += 1
            elif not any(ious[i][j] >= iou_threshold for j in range(len(truths)) if crowd[j]):
                matrix[background, row_of[d["category_id"]]] += 1
        for t, was_taken in zip(truths, taken):
            if not was_taken:
                matrix[row_of[t["category_id"]], background] += 1
    return matrix


def draw_precision_recall(curves: dict, path: str):
    """A panel per IoU of `precision_recall`'s curves, a line per class with objects, its AP in the legend."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5), layout="constrained")
    for axes, key in zip(figure.subplots(1, len(PR_IOUS)), PR_IOUS):
        for name, precision in curves[key].items():
            if precision is not None:
                axes.plot(curves["recall"], precision, label=f"{name} (AP {np.mean(precision):.3f})")
        axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
        axes.set_title(f"precision-recall per class, {key.replace('iou=', 'IoU ')}")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(loc="lower left", fontsize="small")
    _save(figure, path)


def draw_confusion_matrix(matrix: np.ndarray, names: list[str], iou_threshold: float, score_threshold: float, path):
    """`confusion_matrix`'s counts as a heat map with the count in each cell."""
    from matplotlib.figure import Figure

    labels = names + [BACKGROUND]
    size = 3 + 0.6 * len(labels)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="detected", ylabel="true")
    axes.set_title(f"confusion matrix at IoU {iou_threshold:g}, score >= {score_threshold:g}")
    high = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
        if row < len(names) or column < len(names):  # background detected as background is no count
            axes.text(column, row, str(count), ha="center", va="center", color="white" if count > high else "black")
    _save(figure, path)


def _save(figure, path: str):
    with replaced_when_done(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


def _write_json(value, path: str):
    with replaced_when_done(path) as temporary, open(temporary, "w") as f:
        json.dump(value, f, indent=2)


def write_evaluation_pictures(
    ground_truth: dict,
    detections: list[dict],
    output_dir: str,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
    tools: str = "auto",
) -> list[str]:
    """Writes precision_recall.png and confusion_matrix.png into `output_dir` (created), with their numbers in
    precision_recall.json and confusion_matrix.json; `ground_truth` as `coco_ground_truth` makes it, `detections`
    in COCO's results format (`detections_of`). Returns the four paths."""
    if not 0 <= iou_threshold <= 1 or not 0 <= score_threshold <= 1:
        raise ValueError(f"iou_threshold {iou_threshold} and score_threshold {score_threshold} must be in [0, 1]")
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, name) for name in ("precision_recall", "confusion_matrix")]
    paths = [f"{p}.{ext}" for p in paths for ext in ("png", "json")]
    names = [c["name"] for c in ground_truth["categories"]]
    curves = precision_recall(ground_truth, detections, tools)
    draw_precision_recall(curves, paths[0])
    _write_json(curves, paths[1])
    matrix = confusion_matrix(ground_truth, detections, iou_threshold, score_threshold)
    draw_confusion_matrix(matrix, names, iou_threshold, score_threshold, paths[2])
    counts = {"iou_threshold": iou_threshold, "score_threshold": score_threshold, "rows": "true", "columns": "detected"}
    _write_json(counts | {"classes": names + [BACKGROUND], "counts": matrix.tolist()}, paths[3])
    return paths
