"""COCO folders (Roboflow's `{split}/_annotations.coco.json` beside the images, or `annotations/instances_{split}.json`
with the images in `{split}/`) -> splits in the schema (schema.py), every field of the files checked: a bad entry
is a ValueError naming the file, the entry, the field and its value."""

import json
import os
import re
from textwrap import shorten  # a value's repr cut short: a whole list of images would drown a message

import orjson  # parses a COCO file 3 to 5 times faster than json: Objects365's is 2 GB
from datasets import Dataset

from ..model.box_ops import coco_area
from .image_files import check_images
from .schema import SPLIT_NAMES, finite_number, keep_box, records_to_dataset, warn_of_shared_images


def load_coco(
    folder: str, skip_bad_images: bool = False, sizes: tuple[int, int] | None = None
) -> tuple[dict[str, Dataset], list[str]]:
    """A COCO folder in Roboflow's layout or the standard one; contiguous class ids in order of COCO id; images
    checked by `check_images` (against `sizes`, those they are resized to); a warning where an image is in more
    than one split."""
    files = coco_split_files(folder)
    loaded = {split: _read_coco_file(path) for split, (path, _) in files.items()}
    categories = _used_categories({files[split][0]: coco for split, coco in loaded.items()})
    class_names = [name for _, name in categories]
    index = {coco_id: i for i, (coco_id, _) in enumerate(categories)}
    records = {split: _coco_records(loaded[split], path, images, index) for split, (path, images) in files.items()}
    warn_of_shared_images({files[split][0]: [r["image"] for r in rows] for split, rows in records.items()}, folder)
    splits = {
        split: records_to_dataset(check_images(records[split], path, skip_bad_images, sizes), class_names, crowds=True)
        for split, (path, _) in files.items()
    }
    return splits, class_names


def coco_source_files(folder: str) -> list[str]:
    """The files and folders a COCO folder's splits are read from: its annotation files, and its image folders
    (whose modification times change as images come and go)."""
    return [path for pair in coco_split_files(folder).values() for path in pair]


def coco_split_files(folder: str) -> dict[str, tuple[str, str]]:
    """{split: (its annotation file, its image folder)} of a COCO folder in either layout."""
    files = {}
    for entry in sorted(os.listdir(folder)):
        if os.path.isfile(os.path.join(folder, entry, "_annotations.coco.json")):
            files[SPLIT_NAMES.get(entry, entry)] = (
                os.path.join(folder, entry, "_annotations.coco.json"),
                os.path.join(folder, entry),
            )
    annotations = os.path.join(folder, "annotations")
    for name in sorted(os.listdir(annotations)) if os.path.isdir(annotations) else []:
        if name.startswith("instances_") and name.endswith(".json"):
            split = name.removeprefix("instances_").removesuffix(".json")  # train, val2017, ...
            key = re.sub(r"\d{4}$", "", split)
            files[SPLIT_NAMES.get(key, key)] = (os.path.join(annotations, name), os.path.join(folder, split))
    return files


def _read_coco_file(path: str) -> dict:
    """The loaded file; ValueError naming it where it is not JSON, or its 'images', 'annotations' or 'categories'
    are missing or not lists of objects."""
    try:
        with open(path, "rb") as f:
            text = f.read()
        try:
            coco = orjson.loads(text)
        except orjson.JSONDecodeError:  # json reads what orjson refuses (NaN, Infinity), and names it below
            coco = json.loads(text)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as JSON ({error})") from error
    missing = {"images", "annotations", "categories"} - set(coco if isinstance(coco, dict) else ())
    if missing:
        raise ValueError(
            f"{path}: a COCO detection file needs 'images', 'annotations' and 'categories'; {sorted(missing)} missing"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise ValueError(f"{path}: '{key}' is {shorten(repr(coco[key]), 60)}, not a list")
        for j, entry in enumerate(coco[key]):
            if not isinstance(entry, dict):
                raise ValueError(f"{path}, {key}[{j}] is {shorten(repr(entry), 60)}, not an object")
    for key, fields in (
        ("images", ("id",)),
        ("annotations", ("id", "image_id", "category_id")),
        ("categories", ("id",)),
    ):
        for entry in coco[key]:  # ids written as whole floats (1.0, as pandas may write them) are the ints they hold
            for field in fields:
                if isinstance(entry.get(field), float) and entry[field].is_integer():
                    entry[field] = int(entry[field])
    return coco


def _integer(value, where: str) -> int:
    """`value` if it is an int (not a bool), else a ValueError naming `where`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{where} is {value!r}, not an integer")


def _used_categories(cocos: dict[str, dict]) -> list[tuple[int, str]]:
    """(COCO id, name) sorted by id, from {path: loaded file}. Roboflow adds the supercategory itself as a category
    without boxes; such a category is left out. ValueError naming the file where an id has two names (within a
    file or across the splits' files) or a name two ids."""
    categories, where, supercategories, used = {}, {}, set(), set()
    for path, coco in cocos.items():
        for j, c in enumerate(coco["categories"]):
            if "id" not in c or "name" not in c:
                raise ValueError(f"{path}: every entry of 'categories' needs an 'id' and a 'name', got {c!r}")
            _integer(c["id"], f"{path}, categories[{j}]: id")
            if not isinstance(c["name"], str) or not c["name"]:
                raise ValueError(f"{path}, categories[{j}]: name is {c['name']!r}, not a class name")
            if categories.get(c["id"], c["name"]) != c["name"]:
                raise ValueError(
                    f"{path}: category id {c['id']} is {c['name']!r} here and {categories[c['id']]!r} in "
                    f"{where[c['id']]}; one id, one name"
                )
            categories[c["id"]], where[c["id"]] = c["name"], path
            if c.get("supercategory") not in (None, "", "none", c["name"]):
                supercategories.add(c["supercategory"])
        used |= {a.get("category_id") for a in coco["annotations"] if isinstance(a.get("category_id"), int)}
    kept = [(i, name) for i, name in sorted(categories.items()) if i in used or name not in supercategories]
    names = [name for _, name in kept]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        ids = [i for i, name in kept if name == twice[0]]
        raise ValueError(f"{where[ids[-1]]}: the class {twice[0]!r} has the category ids {ids}; one name, one id")
    return kept


def _image_entries(coco: dict, path: str) -> dict:
    """{image id: its index in 'images'}; ValueError naming the file and the entry where an entry lacks a field,
    has a bad one or repeats an id."""
    entries = {}
    for j, image in enumerate(coco["images"]):
        where = f"{path}, images[{j}]"
        missing = {"id", "file_name", "width", "height"} - set(image)
        if missing:
            raise ValueError(f"{where}: needs 'id', 'file_name', 'width' and 'height'; {sorted(missing)} missing")
        _integer(image["id"], f"{where}: id")
        if image["id"] in entries:
            raise ValueError(f"{path}: images[{entries[image['id']]}] and images[{j}] have the same id {image['id']!r}")
        entries[image["id"]] = j
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise ValueError(f"{where}: file_name is {image['file_name']!r}, not a file name")
        for key in ("width", "height"):
            finite_number(image[key], f"{where}: {key}")
    return entries


def _check_annotation(a: dict, where: str, image_ids: dict, index: dict):
    """ValueError naming `where`, the field and its value where the annotation `a` has a bad field."""
    for key, ids, entries in (("image_id", image_ids, "images"), ("category_id", index, "categories")):
        if _integer(a.get(key), f"{where}: {key}") not in ids:
            raise ValueError(f"{where}: {key} {a[key]!r} is not in '{entries}'")
    if not isinstance(a.get("bbox"), list) or len(a["bbox"]) != 4:
        raise ValueError(f"{where}: bbox must be [x, y, w, h], got {a.get('bbox')!r}")
    for k, value in enumerate(a["bbox"]):
        finite_number(value, f"{where}: bbox[{k}]")
    if "area" in a:
        finite_number(a["area"], f"{where}: area")
    if a.get("id") is not None:
        _integer(a["id"], f"{where}: id")
    if a.get("iscrowd") not in (None, 0, 1):  # "0" would be a crowd, as bool("0") is True
        raise ValueError(f"{where}: iscrowd is {a['iscrowd']!r}, not 0 or 1")


def _refuse_corners(coco: dict, path: str, tolerance: float = 1.0):
    """ValueError naming the file and its first such box where most of its boxes run past their image as COCO's
    [x, y, w, h] but fit it as corners [x0, y0, x1, y1]: a file written in the other convention, whose boxes
    would be clipped to the image and trained on wrongly. `tolerance`: pixels a box may pass its image by."""
    sizes = {image["id"]: image for image in coco["images"]}
    corners = []
    for j, a in enumerate(coco["annotations"]):
        image, (x, y, w, h) = sizes[a["image_id"]], a["bbox"]
        width, height = image["width"] + tolerance, image["height"] + tolerance
        if (x + w > width or y + h > height) and x < w <= width and y < h <= height:
            corners.append((j, a, image))
    if corners and len(corners) > len(coco["annotations"]) / 2:
        j, a, image = corners[0]
        raise ValueError(
            f"{path}: {len(corners)} of its {len(coco['annotations'])} boxes run past their image as COCO's [x, y, "
            f"w, h] but fit it as corners [x0, y0, x1, y1] (annotations[{j}] (id {a.get('id')}): bbox {a['bbox']} "
            f"on {image['file_name']}, {image['width']}x{image['height']}); COCO boxes are [x, y, w, h] in pixels: "
            "write [x0, y0, x1 - x0, y1 - y0]"
        )


def _coco_records(coco: dict, path: str, image_folder: str, index: dict) -> list[dict]:
    """The rows of the schema of one split's file (`index`: COCO category id -> class id)."""
    by_image = {image_id: [] for image_id in _image_entries(coco, path)}
    for j, a in enumerate(coco["annotations"]):
        where = f"{path}, annotations[{j}] (id {a.get('id')})"
        _check_annotation(a, where, by_image, index)
        if keep_box(a["bbox"], where):
            by_image[a["image_id"]].append(a)
    _refuse_corners(coco, path)
    records = []
    for image in coco["images"]:
        file = os.path.join(image_folder, image["file_name"])
        objects = by_image[image["id"]]
        records.append(
            {
                "image": file,
                "image_id": image["id"],
                "width": image["width"],
                "height": image["height"],
                "objects": {
                    "id": [a.get("id", j) for j, a in enumerate(objects)],
                    "area": [coco_area(a["bbox"], a.get("area")) for a in objects],
                    "bbox": [a["bbox"] for a in objects],
                    "category": [index[a["category_id"]] for a in objects],
                    "iscrowd": [int(a.get("iscrowd") or 0) for a in objects],
                },
            }
        )
    return records
