"""Detection datasets in one schema, whatever their source.

Every source becomes a `datasets.DatasetDict` in the schema of the Hub's cppe-5 set: `image`, `image_id`,
`width`, `height` and `objects{id, area, bbox, category}`, with COCO boxes (x, y, w, h in pixels) and the
class names in the `category` ClassLabel; COCO folders add `objects.iscrowd` (crowd regions are not trained on,
and evaluation ignores detections on them). Sources:

- a Hub dataset id, or a local folder that `datasets.load_dataset` reads (e.g. an imagefolder with a
  `metadata.jsonl` holding `objects`);
- a `save_to_disk` folder;
- a COCO folder: Roboflow's `{split}/_annotations.coco.json` beside the images, or
  `annotations/instances_{split}.json` with the images in `{split}/`;
- a Pascal VOC folder: `Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/{split}.txt`.
"""

import json
import logging
import math
import os
import random
import re
import warnings
import xml.etree.ElementTree as ElementTree

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value
from PIL import Image

from ..box_ops import box_area, box_xywh_to_xyxy, box_xyxy_to_xywh
from ..image_processing_deformable_detr import DeformableDetrImageProcessor, to_rgb_image
from .image_files import UNREADABLE, check_images, header_or_error, image_name, report_unreadable

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}


def detection_features(class_names: list[str], crowds: bool = False) -> Features:
    objects = {
        "id": List(Value("int64")),
        "area": List(Value("float32")),
        "bbox": List(List(Value("float32"), length=4)),
        "category": List(ClassLabel(names=class_names)),
    }
    if crowds:
        objects["iscrowd"] = List(Value("int8"))
    return Features(
        {
            "image": datasets.Image(),
            "image_id": Value("int64"),
            "width": Value("int32"),
            "height": Value("int32"),
            "objects": objects,
        }
    )


def dataset_format(source: str) -> str:
    """'save_to_disk', 'coco', 'voc', or 'load_dataset' (Hub ids and folders that datasets reads itself)."""
    if not os.path.isdir(source):
        if source.startswith(("/", "./", "../", "~")) or os.path.isfile(source):
            raise FileNotFoundError(f"dataset {source}: no such folder (a dataset is a folder or a Hub id)")
        return "load_dataset"
    entries = set(os.listdir(source))
    if entries & {"dataset_dict.json", "state.json"}:
        return "save_to_disk"
    if {"Annotations", "JPEGImages"} <= entries:
        return "voc"
    if any(os.path.isfile(os.path.join(source, e, "_annotations.coco.json")) for e in entries) or (
        os.path.isdir(os.path.join(source, "annotations"))
        and any(f.startswith("instances_") for f in os.listdir(os.path.join(source, "annotations")))
    ):
        return "coco"
    return "load_dataset"


def records_to_dataset(records: list[dict], class_names: list[str], crowds: bool = False) -> Dataset:
    """Rows of the schema (`image` a path or a PIL image) -> a Dataset whose `category` names the classes."""
    columns = {key: [r[key] for r in records] for key in ("image", "image_id", "width", "height", "objects")}
    return Dataset.from_dict(columns, features=detection_features(class_names, crowds))


def objects_of_boxes(boxes: list, categories: list) -> dict:
    """The `objects` of one image from its COCO boxes and class ids."""
    return {
        "id": list(range(len(boxes))),
        "area": [w * h for _, _, w, h in boxes],
        "bbox": boxes,
        "category": categories,
    }


def _number(value, where: str):
    """`value` if it is a finite int or float (not a bool, nor a string holding a number), else a ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise ValueError(f"{where} is {value!r}, not a finite number")


def _voc_number(parent, key: str, where: str) -> float:
    """The number in `parent`'s `key` element; a missing element is a TypeError (`float(None)`)."""
    text = parent.findtext(key)
    try:
        number = float(text)
    except ValueError:
        number = text
    return _number(number, f"{where}: {key}")


def _keep_box(box, where: str) -> bool:
    if box[2] > 0 and box[3] > 0:
        return True
    warnings.warn(f"{where}: box {box} has no area; it is left out", stacklevel=1)  # about the data, not the caller
    return False


def load_voc(folder: str, skip_bad_images: bool = False) -> tuple[dict[str, Dataset], list[str]]:
    """Pascal VOC: one split per `ImageSets/Main/{train,val,test}.txt`; classes sorted by name; images checked
    by `check_images`."""
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
        parsed[split] = [_parse_voc_xml(folder, stem) for stem in stems]
    class_names = sorted({name for items in parsed.values() for item in items for name, _ in item["objects"]})
    _warn_of_case_variants(class_names, [item for items in parsed.values() for item in items], folder)
    index = {name: i for i, name in enumerate(class_names)}
    splits, image_id = {}, 0
    for split, items in parsed.items():
        records = []
        for item in items:
            kept = [(name, box) for name, box in item["objects"] if _keep_box(box, item["xml"])]
            boxes, names = [box for _, box in kept], [index[name] for name, _ in kept]
            records.append(
                {
                    "image": item["image"],
                    "image_id": image_id,
                    "width": item["width"],
                    "height": item["height"],
                    "objects": objects_of_boxes(boxes, names),
                }
            )
            image_id += 1
        records = check_images(records, f"{folder} [{split}]", skip_bad_images)
        splits[split] = records_to_dataset(records, class_names)
    return splits, class_names


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
        for name in dict.fromkeys(name for name, _ in item["objects"] if name in files):
            files[name].append(os.path.basename(item["xml"]))
    described = "; ".join(
        f"{name!r} in {', '.join(found[:3])}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        for name, found in files.items()
    )
    warnings.warn(
        f"{folder}: class names that differ only in case are separate classes: {described}",
        stacklevel=1,  # about the data, not the caller
    )


def _parse_voc_xml(folder: str, stem: str) -> dict:
    path = os.path.join(folder, "Annotations", f"{stem}.xml")
    try:
        root = ElementTree.parse(path).getroot()
        size = root.find("size")
        width, height = (int(_voc_number(size, key, f"{path}, size")) for key in ("width", "height"))
        objects = []
        for i, obj in enumerate(root.iter("object")):
            name, box = obj.findtext("name").strip(), obj.find("bndbox")
            where = f"{path}, object {i} ({name!r})"
            x0, y0, x1, y1 = (_voc_number(box, key, where) for key in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((name, [x0, y0, x1 - x0, y1 - y0]))
    except (OSError, ElementTree.ParseError, AttributeError, TypeError) as error:
        raise ValueError(
            f"{path}: not a readable Pascal VOC annotation (needs size/width, size/height and "
            f"object/name, object/bndbox/xmin..ymax): {error}"
        ) from error
    filename = root.findtext("filename") or f"{stem}.jpg"
    image = os.path.join(folder, "JPEGImages", os.path.basename(filename))
    if not os.path.exists(image):
        raise FileNotFoundError(f"{path} names the image {image}, which does not exist")
    return {"xml": path, "image": image, "width": width, "height": height, "objects": objects}


def load_coco(folder: str, skip_bad_images: bool = False) -> tuple[dict[str, Dataset], list[str]]:
    """A COCO folder in Roboflow's layout or the standard one; contiguous class ids in order of COCO id; images
    checked by `check_images`."""
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
    loaded = {}
    for split, (path, _image_folder) in files.items():
        try:
            with open(path) as f:
                loaded[split] = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not readable as JSON ({error})") from error
        missing = {"images", "annotations", "categories"} - set(loaded[split])
        if missing:
            raise ValueError(
                f"{path}: a COCO detection file needs 'images', 'annotations' and 'categories'; "
                f"{sorted(missing)} missing"
            )
    categories = _used_categories({files[split][0]: coco for split, coco in loaded.items()})
    class_names = [name for _, name in categories]
    index = {coco_id: i for i, (coco_id, _) in enumerate(categories)}
    splits = {
        split: _coco_split(coco, files[split][1], files[split][0], index, class_names, skip_bad_images)
        for split, coco in loaded.items()
    }
    return splits, class_names


def _used_categories(cocos: dict[str, dict]) -> list[tuple[int, str]]:
    """(COCO id, name) sorted by id, from {path: loaded file}. Roboflow adds the supercategory itself as a category
    without boxes; such a category is left out. ValueError naming the file where an id has two names (within a
    file or across the splits' files) or a name two ids."""
    categories, where, supercategories, used = {}, {}, set(), set()
    for path, coco in cocos.items():
        for c in coco["categories"]:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise ValueError(f"{path}: every entry of 'categories' needs an 'id' and a 'name', got {c!r}")
            if categories.get(c["id"], c["name"]) != c["name"]:
                raise ValueError(
                    f"{path}: category id {c['id']} is {c['name']!r} here and {categories[c['id']]!r} in "
                    f"{where[c['id']]}; one id, one name"
                )
            categories[c["id"]], where[c["id"]] = c["name"], path
            if c.get("supercategory") not in (None, "", "none", c["name"]):
                supercategories.add(c["supercategory"])
        used |= {a["category_id"] for a in coco["annotations"] if isinstance(a, dict) and "category_id" in a}
    kept = [(i, name) for i, name in sorted(categories.items()) if i in used or name not in supercategories]
    names = [name for _, name in kept]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        ids = [i for i, name in kept if name == twice[0]]
        raise ValueError(f"{where[ids[-1]]}: the class {twice[0]!r} has the category ids {ids}; one name, one id")
    return kept


def _coco_split(
    coco: dict, image_folder: str, path: str, index: dict, class_names: list[str], skip_bad_images: bool
) -> Dataset:
    entries = {}  # image id -> its index in 'images'
    for j, image in enumerate(coco["images"]):
        missing = {"id", "file_name", "width", "height"} - set(image)
        if missing:
            raise ValueError(
                f"{path}, images[{j}]: needs 'id', 'file_name', 'width' and 'height'; {sorted(missing)} missing"
            )
        if image["id"] in entries:
            raise ValueError(f"{path}: images[{entries[image['id']]}] and images[{j}] have the same id {image['id']!r}")
        entries[image["id"]] = j
        for key in ("width", "height"):
            _number(image[key], f"{path}, images[{j}]: {key}")
    by_image = {image_id: [] for image_id in entries}
    for j, a in enumerate(coco["annotations"]):
        where = f"{path}, annotations[{j}] (id {a.get('id')})"
        if a.get("image_id") not in by_image:
            raise ValueError(f"{where}: image_id {a.get('image_id')!r} is not in 'images'")
        if a.get("category_id") not in index:
            raise ValueError(f"{where}: category_id {a.get('category_id')!r} is not in 'categories'")
        if not isinstance(a.get("bbox"), list) or len(a["bbox"]) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {a.get('bbox')!r}")
        for k, value in enumerate(a["bbox"]):
            _number(value, f"{where}: bbox[{k}]")
        if "area" in a:
            _number(a["area"], f"{where}: area")
        if _keep_box(a["bbox"], where):
            by_image[a["image_id"]].append(a)
    records = []
    for image in coco["images"]:
        file = os.path.join(image_folder, image["file_name"])
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path}: image {image['id']} is {file}, which does not exist")
        objects = by_image[image["id"]]
        records.append(
            {
                "image": file,
                "image_id": image["id"],
                "width": image["width"],
                "height": image["height"],
                "objects": {
                    "id": [a.get("id", j) for j, a in enumerate(objects)],
                    "area": [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in objects],
                    "bbox": [a["bbox"] for a in objects],
                    "category": [index[a["category_id"]] for a in objects],
                    "iscrowd": [int(bool(a.get("iscrowd", 0))) for a in objects],
                },
            }
        )
    return records_to_dataset(check_images(records, path, skip_bad_images), class_names, crowds=True)


def category_names(dataset: Dataset, source: str) -> list[str]:
    """Class names from the `objects.category` ClassLabel; plain integer ids give '0', '1', ..."""
    objects = dataset.features.get("objects")
    if objects is None or "image" not in dataset.features:
        raise ValueError(
            f"{source}: a detection dataset needs the columns 'image' and 'objects', got {sorted(dataset.features)}"
        )
    if isinstance(objects, List):  # a list of per-object dicts
        objects = objects.feature
    if not isinstance(objects, dict) or not {"bbox", "category"} <= set(objects):
        raise ValueError(f"{source}: 'objects' needs the fields 'bbox' and 'category', got {objects}")
    category = objects["category"]
    category = category.feature if isinstance(category, List) else category
    if isinstance(category, ClassLabel):
        return list(category.names)
    largest = max(
        (max(objects_of(row)["category"], default=-1) for row in dataset.select_columns("objects")), default=-1
    )
    warnings.warn(
        f"{source}: 'objects.category' is not a ClassLabel, so the classes are named '0'..'{largest}'",
        stacklevel=1,  # about the data set, not the caller
    )
    return [str(i) for i in range(largest + 1)]


def objects_of(example: dict) -> dict:
    """The `objects` of one example as {"bbox", "category", "area", "iscrowd"} lists, whether they are stored as
    a dict of lists or a list of dicts; a missing area is the box's, a missing iscrowd 0."""
    objects = example["objects"]
    if isinstance(objects, list):
        objects = {key: [o.get(key) for o in objects] for key in ("bbox", "category", "area", "iscrowd")}
    count = len(objects["bbox"])
    areas = [
        w * h if a is None else a for a, (_, _, w, h) in zip(objects.get("area") or [None] * count, objects["bbox"])
    ]
    crowds = [int(c or 0) for c in objects.get("iscrowd") or [0] * count]
    return {"bbox": objects["bbox"], "category": objects["category"], "area": areas, "iscrowd": crowds}


def load_detection_dataset(
    source: str, validation_fraction: float = 0.15, seed: int = 42, skip_bad_images: bool = False
) -> tuple[DatasetDict, list[str]]:
    """Any supported source -> (DatasetDict with 'train' and 'validation', and maybe 'test'; class names).
    Without a validation split, `validation_fraction` of 'train' becomes one (by `seed`; the defaults are the
    training command's, so that they hold out the images a run with default options held out). Every image's header
    is read: unreadable images raise ValueError listing them, or are left out with `skip_bad_images`."""
    kind = dataset_format(source)
    if kind == "voc":
        splits, class_names = load_voc(source, skip_bad_images)
    elif kind == "coco":
        splits, class_names = load_coco(source, skip_bad_images)
    else:
        loaded = datasets.load_from_disk(source) if kind == "save_to_disk" else datasets.load_dataset(source)
        if isinstance(loaded, Dataset):
            loaded = DatasetDict(train=loaded)
        splits = {SPLIT_NAMES.get(name, name): split for name, split in loaded.items()}
        if "train" not in splits:
            raise ValueError(f"{source} has no 'train' split; its splits are {sorted(loaded)}")
        class_names = category_names(splits["train"], source)
        splits = {name: _readable_rows(split, f"{source} [{name}]", skip_bad_images) for name, split in splits.items()}
    if "train" not in splits:
        raise ValueError(f"{source} has no train split; it has {sorted(splits)}")
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:  # an empty validation split scored "n/a" and chose the "best" model on nothing
        raise ValueError(
            f"{source}: its {empty[0]} split has no images; give it some, or leave it out (without a validation "
            "split, validation_fraction of the training images becomes one)"
        )
    # images without objects are fine beside others, but training on none learns nothing (loss 0, metrics n/a)
    if not any(0 in objects_of(row)["iscrowd"] for row in splits["train"].select_columns("objects")):  # a non-crowd box
        raise ValueError(
            f"{source} has no boxes in its training split: none of its {len(splits['train'])} images has an "
            "object to train on (crowd regions are not trained on)"
        )
    if "validation" not in splits:
        if not 0 < validation_fraction < 1:
            raise ValueError(
                f"{source} has no validation split and validation_fraction={validation_fraction} cannot make one"
            )
        parts = splits["train"].train_test_split(test_size=validation_fraction, seed=seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
        logger.info(
            "%s has no validation split: %d of its %d training images became one",
            source,
            len(parts["test"]),
            len(parts["train"]) + len(parts["test"]),
        )
    return DatasetDict(splits), class_names


def _readable_rows(split: Dataset, where: str, skip_bad_images: bool) -> Dataset:
    """`split` without the rows whose image cannot be read (with skip_bad_images; else ValueError naming them).
    The images are read one row at a time, their headers only."""
    undecoded = split.cast_column("image", datasets.Image(decode=False)).select_columns("image")
    bad = {}  # row -> why
    for row, example in enumerate(undecoded):
        _, why = header_or_error(example["image"])
        if why is not None:
            bad[row] = why
    report_unreadable(list(bad.values()), where, skip_bad_images)
    return split.select([row for row in range(len(split)) if row not in bad]) if bad else split


class DetectionSamples(torch.utils.data.Dataset):
    """Examples of a detection dataset as (image, COCO annotation) pairs for the image processor, the image id
    being the row index. With an `augmentation`, each sample is augmented by a generator seeded with
    (seed, epoch, index): the same epoch gives the same images in any process, worker or resumed run.

    An image that cannot be decoded (its header was fine when the dataset was loaded: a truncated file, one
    changed since) raises ValueError naming it; with `skip_unreadable` (training) it is skipped with a warning
    naming it and counting the skips so far, and the next image takes its place."""

    def __init__(self, dataset: Dataset, augmentation=None, seed: int = 0, skip_unreadable: bool = False):
        self.dataset, self.augmentation, self.seed, self.epoch = dataset, augmentation, seed, 0
        self.skip_unreadable, self.skipped = skip_unreadable, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def decoded(self, index: int) -> tuple[int, dict, Image.Image]:
        """(index, example, RGB image) of the first image from `index` on that decodes."""
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            try:
                example = self.dataset[row]
                return row, example, to_rgb_image(example["image"])
            except UNREADABLE as error:
                name = self.image_name(row)
                if not self.skip_unreadable:
                    raise ValueError(f"{name}: cannot be decoded ({type(error).__name__}: {error})") from error
                self.skipped += 1
                logger.warning(
                    "%s cannot be decoded (%s: %s): skipped, the next image instead (%d skip(s) in this process)",
                    name,
                    type(error).__name__,
                    error,
                    self.skipped,
                )
        raise ValueError("no image of the dataset can be decoded")

    def image_name(self, row: int) -> str:
        rows = self.dataset
        if isinstance(rows, Dataset):  # the path, without decoding
            rows = rows.cast_column("image", datasets.Image(decode=False))
        return image_name(rows[row]["image"])

    def __getitem__(self, index: int) -> dict:
        index, example, image = self.decoded(index)
        objects = objects_of(example)
        boxes = box_xywh_to_xyxy(torch.from_numpy(np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4))).numpy()
        categories, areas = (
            np.asarray(objects["category"], dtype=np.int64),
            np.asarray(objects["area"], dtype=np.float32),
        )
        crowds = np.asarray(objects["iscrowd"], dtype=np.int64)
        if self.augmentation is not None:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            image, boxes, keep = self.augmentation(image, boxes, rng)
            categories, crowds, areas = (
                categories[keep],
                crowds[keep],
                box_area(torch.from_numpy(boxes)).numpy(),
            )
        boxes = box_xyxy_to_xywh(torch.from_numpy(boxes)).numpy()
        annotation = {
            "image_id": index,
            "annotations": [  # the processor leaves crowd regions out, as DETR
                {"bbox": box.tolist(), "category_id": int(c), "area": float(a), "iscrowd": int(crowd)}
                for box, c, a, crowd in zip(boxes, categories, areas, crowds)
            ],
        }
        return {"image": image, "annotation": annotation}


class DetectionCollator:
    """Samples -> the model's batch: `pixel_values`, `pixel_mask`, `labels` (per image `class_labels`,
    normalised `boxes` and the rest of the processor's labels), and `orig_sizes` (B, 2) as (h, w).

    Label boxes are relative to each image's own size (the processor's `boxes_relative_to="image"`), as the
    paper's code has them and as the model predicts them, whatever padding the batch needs."""

    def __init__(self, processor):
        self.processor = DeformableDetrImageProcessor(**{**processor.to_dict(), "boxes_relative_to": "image"})

    def __call__(self, samples: list[dict]) -> dict:
        images = [s["image"] for s in samples]
        batch = self.processor(images, annotations=[s["annotation"] for s in samples], return_tensors="pt")
        labels = [dict(label) for label in batch["labels"]]
        return {
            "pixel_values": batch["pixel_values"],
            "pixel_mask": batch["pixel_mask"],
            "labels": labels,
            "orig_sizes": torch.tensor([(im.height, im.width) for im in images]),
        }
