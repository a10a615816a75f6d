"""COCO evaluation with pycocotools (or faster-coco-eval, the same numbers, where installed): mAP@[.5:.95], mAP50,
mAP75, small/medium/large, recall, and AP per class; predictions are gathered from every process before scoring."""

import contextlib
import io

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.objects import objects_of
from ..model.box_ops import box_xyxy_to_xywh
from .metric_names import SUMMARY_AREAS, SUMMARY_LABELS, SUMMARY_NAMES
from .predictions import not_finite, warn_of_non_finite_outputs

AREA_RANGES = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}  # COCO's


def coco_ground_truth(dataset, class_names: list[str]) -> dict:
    """A dataset in our schema -> a COCO ground-truth dict; image ids are row indices, category ids class ids."""
    images, annotations = [], []
    for index, example in enumerate(dataset.select_columns(["objects"])):
        images.append({"id": index})
        objects = objects_of(example)
        for box, category, area, crowd in zip(
            objects["bbox"], objects["category"], objects["area"], objects["iscrowd"]
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index,
                    "category_id": int(category),
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": crowd,
                }
            )
    categories = [{"id": i, "name": name} for i, name in enumerate(class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_tools(tools: str = "auto"):
    """(COCO, COCOeval) of `tools`: "pycocotools", "faster-coco-eval" (the same twelve numbers, 8x faster on 5,000
    images x 100 detections; scripts/benchmark.py --only evaluation), or "auto", the latter where installed."""
    if tools in ("auto", "faster-coco-eval"):
        try:
            from faster_coco_eval import COCO, COCOeval_faster

            return COCO, COCOeval_faster
        except ImportError:
            if tools != "auto":
                raise
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    return COCO, COCOeval


def coco_metrics(ground_truth: dict, detections: list[dict], tools: str = "auto") -> dict:
    """COCOeval on bbox detections `{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`.

    Returns the twelve summary numbers (`map`, `map_50`, ...; -1 where the data has no such objects) and
    per class `{"name": {"ap", "ap_50", "objects"}}` under `per_class` (ap is None for a class without objects).
    """
    if not detections:  # pycocotools cannot load none: 0, or -1 where the data has no such objects, as it would say
        areas = [a["area"] for a in ground_truth["annotations"] if not a["iscrowd"]]

        def has_objects(name: str) -> bool:
            low, high = AREA_RANGES[SUMMARY_AREAS[name]]
            return any(low <= area <= high for area in areas)

        summary = {name: 0.0 if has_objects(name) else -1.0 for name in SUMMARY_NAMES}
        per_class = {c["name"]: {"ap": 0.0, "ap_50": 0.0} for c in ground_truth["categories"]}
    else:
        evaluator = accumulated_evaluation(ground_truth, detections, tools)
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints the table
            evaluator.summarize()
        summary = {name: float(v) for name, v in zip(SUMMARY_NAMES, evaluator.stats)}
        precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, classes, areas, max dets)
        per_class = {}
        for k, category_id in enumerate(evaluator.params.catIds):
            name = evaluator.cocoGt.cats[category_id]["name"]
            values = precision[:, :, k, 0, -1]
            per_class[name] = {"ap": _mean_valid(values), "ap_50": _mean_valid(values[0])}
    counts = np.bincount(
        [a["category_id"] for a in ground_truth["annotations"] if not a["iscrowd"]],
        minlength=len(ground_truth["categories"]),
    )
    for category in ground_truth["categories"]:
        per_class[category["name"]]["objects"] = int(counts[category["id"]])
        if not counts[category["id"]]:
            per_class[category["name"]].update(ap=None, ap_50=None)
    return summary | {"per_class": per_class}


def accumulated_evaluation(ground_truth: dict, detections: list[dict], tools: str = "auto"):
    """COCOeval of `detections` (at least one) on `ground_truth`, evaluated and accumulated: its
    eval["precision"] is (10 IoU thresholds 0.5:0.95, 101 recall points, classes, 4 area ranges, 3 max dets), -1
    for a class without objects."""
    COCO, COCOeval = coco_tools(tools)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def format_metrics(metrics: dict) -> str:
    """A readable table of `coco_metrics`' output."""
    lines = [f"{'metric':<14}{'value':>8}"]
    for name, label in zip(SUMMARY_NAMES, SUMMARY_LABELS):
        value = metrics[name]
        lines.append(f"{label:<14}{'n/a' if value < 0 else f'{value:.3f}':>8}")
    # a class name with a line break or other control character, escaped, keeps its row on one line
    names = {
        name: name if name.isprintable() else name.encode("unicode_escape").decode() for name in metrics["per_class"]
    }
    width = max([5] + [len(shown) for shown in names.values()]) + 2
    lines += ["", f"{'class':<{width}}{'AP':>8}{'AP50':>8}{'objects':>9}"]
    for name, values in metrics["per_class"].items():
        ap, ap_50 = ("n/a" if v is None else f"{v:.3f}" for v in (values["ap"], values["ap_50"]))
        lines.append(f"{names[name]:<{width}}{ap:>8}{ap_50:>8}{values['objects']:>9}")
    return "\n".join(lines)


def evaluate(model, processor, dataloader, accelerator, ground_truth: dict, stop=None) -> dict | None:
    """`coco_metrics` of `detections_of` the model on `dataloader`; None when `stop` stopped it."""
    detections = detections_of(model, processor, dataloader, accelerator, stop)
    return None if detections is None else coco_metrics(ground_truth, detections)


@torch.no_grad()
def detections_of(model, processor, dataloader, accelerator, stop=None) -> list[dict] | None:
    """Runs `model` over a prepared `dataloader` of `DetectionCollator` batches (image ids = row indices) in
    every process and gathers the top-100 detections per image, in COCO's results format (`{"image_id",
    "category_id", "bbox": [x, y, w, h], "score"}`), by image id. With `stop` (whose `requested` a signal sets), it
    returns None at the next batch once any process was asked to stop."""
    was_training = model.training
    model.eval()
    detections = {}
    broken = []  # rows whose outputs were not finite
    for batch in tqdm(dataloader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False):
        if stop is not None and accelerator.reduce(torch.tensor(float(stop.requested), device=accelerator.device)):
            model.train(was_training)
            return None
        outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        broken += [int(batch["labels"][i]["image_id"][0]) for i in not_finite(outputs)]
        results = processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=batch["orig_sizes"], top_k=100
        )
        for label, result in zip(batch["labels"], results):
            image_id = int(label["image_id"][0])
            boxes = box_xyxy_to_xywh(result["boxes"].float().cpu())
            detections[image_id] = [
                {
                    "image_id": image_id,
                    "category_id": int(c),
                    "bbox": [round(float(v), 3) for v in box],
                    "score": float(s),
                }
                for c, box, s in zip(result["labels"], boxes, result["scores"].float())
            ]
    warn_of_non_finite_outputs([dataloader.dataset.image_name(row) for row in broken])
    # every process holds some images (repeated ones pad the last batch); each image is counted once
    merged = {}
    for part in gather_object([detections]):
        merged.update(part)
    model.train(was_training)
    return [d for image_id in sorted(merged) for d in merged[image_id]]
