"""Pascal VOC folders (`Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/{split}.txt`) -> splits in the schema
(schema.py). Objects marked `<difficult>1</difficult>` become `iscrowd` regions: not trained on (as mmdetection's
ignored boxes), and evaluation ignores detections on them as COCO's crowd regions (by overlap over the detection's
area: more lenient than VOC's own evaluation)."""

import os
import warnings
import xml.etree.ElementTree as ElementTree
from collections import Counter

from datasets import Dataset

from ..utils.messages import listed
from .image_files import check_images
from .objects import objects_of_boxes
from .schema import SPLIT_NAMES, finite_number, keep_box, records_to_dataset, warn_of_shared_images


def load_voc(
    folder: str, skip_bad_images: bool = False, sizes: tuple[int, int] | None = None
) -> tuple[dict[str, Dataset], list[str]]:
    """Pascal VOC: one split per `ImageSets/Main/{train,val,test}.txt`; classes sorted by name; images checked
    by `check_images` (against `sizes`, those they are resized to); a warning where an image is in more than one
    split."""
    split_files = {}
    main = os.path.join(folder, "ImageSets", "Main")
    for name in sorted(os.listdir(main)) if os.path.isdir(main) else []:
        stem = name.removesuffix(".txt")
        if name.endswith(".txt") and stem in SPLIT_NAMES:
            split_files[SPLIT_NAMES[stem]] = os.path.join(main, name)
    if not split_files:
        raise FileNotFoundError(f"{main} holds no train.txt, val.txt or test.txt listing the images of each split")
    parsed = {}
    for split, path in split_files.items():
        with open(path) as f:
            stems = [line.split()[0] for line in f if line.strip()]
        repeated = [stem for stem, count in Counter(stems).items() if count > 1]
        if repeated:  # trained on twice an epoch, and scored twice
            warnings.warn(
                f"{path} lists {len(repeated)} image(s) more than once: {listed(repeated)}; each is read once",
                stacklevel=1,  # about the data, not the caller
            )
        parsed[split] = [_parse_voc_xml(folder, stem) for stem in dict.fromkeys(stems)]
    warn_of_shared_images({split_files[s]: [item["image"] for item in items] for s, items in parsed.items()}, folder)
    class_names = sorted({o["name"] for items in parsed.values() for item in items for o in item["objects"]})
    _warn_of_case_variants(class_names, [item for items in parsed.values() for item in items], folder)
    index = {name: i for i, name in enumerate(class_names)}
    splits, image_id = {}, 0
    for split, items in parsed.items():
        records = []
        for item in items:
            kept = [o for o in item["objects"] if keep_box(o["box"], item["xml"])]
            objects = objects_of_boxes(
                [o["box"] for o in kept], [index[o["name"]] for o in kept], [o["difficult"] for o in kept]
            )
            records.append(
                {
                    "image": item["image"],
                    "image_id": image_id,
                    "width": item["width"],
                    "height": item["height"],
                    "objects": objects,
                }
            )
            image_id += 1
        records = check_images(records, f"{folder} [{split}]", skip_bad_images, sizes)
        splits[split] = records_to_dataset(records, class_names, crowds=True)
    return splits, class_names


def voc_source_files(folder: str) -> list[str]:
    """The files and folders a VOC folder's splits are read from: the split lists, every annotation, and the
    image folder (whose modification time changes as images come and go)."""
    found = [os.path.join(folder, "JPEGImages")]
    for part in (os.path.join("ImageSets", "Main"), "Annotations"):
        if os.path.isdir(path := os.path.join(folder, part)):
            found += [entry.path for entry in os.scandir(path)]
    return found


def _warn_of_case_variants(class_names: list[str], items: list[dict], folder: str):
    """Warns of class names that differ only in case ('rbc', 'RBC'): they stay separate classes."""
    variants = {}
    for name in class_names:
        variants.setdefault(name.casefold(), []).append(name)
    clashes = [names for names in variants.values() if len(names) > 1]
    if not clashes:
        return
    files = {name: [] for names in clashes for name in names}
    for item in items:
        for name in dict.fromkeys(o["name"] for o in item["objects"] if o["name"] in files):
            files[name].append(os.path.basename(item["xml"]))
    described = "; ".join(f"{name!r} in {listed(found)}" for name, found in files.items())
    warnings.warn(
        f"{folder}: class names that differ only in case are separate classes: {described}",
        stacklevel=1,  # about the data, not the caller
    )


def _element(parent, key: str, where: str):
    """`parent`'s child element `key`; ValueError naming `where` and the element where it is missing."""
    element = parent.find(key)
    if element is None:
        raise ValueError(f"{where}: no <{key}>")
    return element


def _voc_number(parent, key: str, where: str) -> float:
    """The number in `parent`'s `key` element; ValueError naming `where` and the element where it is missing or
    not a finite number."""
    text = _element(parent, key, where).text
    try:
        number = float(text)
    except (TypeError, ValueError):  # None (an empty element), or not a number
        number = text
    return finite_number(number, f"{where}: {key}")


def _voc_object(obj, where: str) -> dict:
    """One `<object>` -> {"name", "box" (COCO x, y, w, h), "difficult" (0 or 1)}."""
    name = (_element(obj, "name", where).text or "").strip()
    if not name:
        raise ValueError(f"{where}: <name> is empty")
    where = f"{where} ({name!r})"
    box = _element(obj, "bndbox", where)
    x0, y0, x1, y1 = (_voc_number(box, key, where) for key in ("xmin", "ymin", "xmax", "ymax"))
    difficult = (obj.findtext("difficult") or "0").strip()
    flags = {"0": 0, "1": 1, "false": 0, "true": 1}
    if difficult.lower() not in flags:
        raise ValueError(f"{where}: difficult is {difficult!r}, not 0 or 1")
    return {"name": name, "box": [x0, y0, x1 - x0, y1 - y0], "difficult": flags[difficult.lower()]}


def _parse_voc_xml(folder: str, stem: str) -> dict:
    """The annotation of `stem` -> {"xml", "image", "width", "height", "objects"}; ValueError naming the file (and
    the object and element) where it cannot be read."""
    path = os.path.join(folder, "Annotations", f"{stem}.xml")
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise ValueError(f"{path}: not a readable Pascal VOC annotation: {error}") from error
    size = _element(root, "size", path)
    width, height = (int(_voc_number(size, key, f"{path}, size")) for key in ("width", "height"))
    objects = [_voc_object(obj, f"{path}, object {i}") for i, obj in enumerate(root.iter("object"))]
    filename = root.findtext("filename") or f"{stem}.jpg"
    image = os.path.join(folder, "JPEGImages", os.path.basename(filename))
    return {"xml": path, "image": image, "width": width, "height": height, "objects": objects}
