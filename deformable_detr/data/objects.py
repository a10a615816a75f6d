"""One image's `objects` in the schema (schema.py) as plain lists: read in either of the ways datasets stores them,
or made from boxes. No datasets import: the training samples (samples.py) and the evaluation read rows with it."""

from ..model.box_ops import coco_area


def objects_of(example: dict) -> dict:
    """The `objects` of one example as {"bbox", "category", "area", "iscrowd"} lists, whether they are stored as
    a dict of lists or a list of dicts; a missing area is the box's, a missing iscrowd 0."""
    objects = example["objects"]
    if isinstance(objects, list):
        objects = {key: [o.get(key) for o in objects] for key in ("bbox", "category", "area", "iscrowd")}
    count = len(objects["bbox"])
    areas = [coco_area(box, area) for box, area in zip(objects["bbox"], objects.get("area") or [None] * count)]
    crowds = [int(c or 0) for c in objects.get("iscrowd") or [0] * count]
    return {"bbox": objects["bbox"], "category": objects["category"], "area": areas, "iscrowd": crowds}


def objects_of_boxes(boxes: list, categories: list, crowds: list | None = None) -> dict:
    """The `objects` of one image from its COCO boxes and class ids, and with `crowds` its iscrowd flags."""
    objects = {
        "id": list(range(len(boxes))),
        "area": [coco_area(box) for box in boxes],
        "bbox": boxes,
        "category": categories,
    }
    if crowds is not None:
        objects["iscrowd"] = crowds
    return objects
