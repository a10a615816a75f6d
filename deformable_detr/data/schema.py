"""The one schema every detection source becomes, that of the Hub's cppe-5 set: `image`, `image_id`, `width`,
`height` and `objects{id, area, bbox, category}`, with COCO boxes (x, y, w, h in pixels) and the class names in
the `category` ClassLabel; COCO and Pascal VOC folders add `objects.iscrowd` (regions that are not trained on,
and on which evaluation ignores detections). Also the checks that the rows read from annotation files (voc.py,
coco.py) pass on their way into it."""

import hashlib
import math
import os
import warnings

import datasets
import pyarrow as pa
from datasets import ClassLabel, Dataset, DatasetInfo, Features, List, Value
from datasets.table import InMemoryTable

from ..utils.messages import listed

SPLIT_NAMES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}


def detection_features(class_names: list[str], crowds: bool = False) -> Features:
    """The schema's features for `class_names`; with `crowds`, `objects.iscrowd` too."""
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


def records_to_dataset(records: list[dict], class_names: list[str], crowds: bool = False) -> Dataset:
    """Rows of the schema (`image` a path or a PIL image) -> a Dataset whose `category` names the classes. Rows
    whose images are all paths become an Arrow table directly (datasets' own encoding of each row, the same
    table, takes ten times longer)."""
    features = detection_features(class_names, crowds)
    columns = {key: [r[key] for r in records] for key in ("image", "image_id", "width", "height", "objects")}
    if not all(isinstance(image, str) for image in columns["image"]):
        return Dataset.from_dict(columns, features=features)
    columns["image"] = [{"bytes": None, "path": path} for path in columns["image"]]  # as datasets.Image stores one
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features))


def finite_number(value, where: str):
    """`value` if it is a finite int or float (not a bool, nor a string holding a number), else a ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise ValueError(f"{where} is {value!r}, not a finite number")


def keep_box(box, where: str) -> bool:
    """Whether to keep the COCO box `box`: False, with a warning naming `where`, for one without area."""
    if box[2] > 0 and box[3] > 0:
        return True
    warnings.warn(f"{where}: box {box} has no area; it is left out", stacklevel=1)  # about the data, not the caller
    return False


def warn_of_shared_images(images: dict[str, list[str]], source: str):
    """Warns when an image file is in more than one split, by its path or under another name (`_copies`).
    `images`: {a split's file: its image paths}.

    A warning, not an error: a model validated on images it trains on scores too well and picks its best
    checkpoint on them, but some do it on purpose (a check that a model can learn a few images by heart)."""
    splits_of = {}  # image path -> the split files that list it
    for split_file, paths in images.items():
        for path in dict.fromkeys(map(os.path.normpath, paths)):
            splits_of.setdefault(path, []).append(os.path.relpath(split_file, source))
    shared = {}  # "a.txt and b.txt" -> the images they share
    for path, split_files in splits_of.items():
        if len(split_files) > 1:
            shared.setdefault(" and ".join(split_files), []).append(os.path.basename(path))
    if shared:
        described = "; ".join(f"{files} share {len(names)}: {listed(names)}" for files, names in shared.items())
        warnings.warn(
            f"{source}: {sum(map(len, shared.values()))} image(s) are in more than one split ({described}); a model "
            "validated or tested on images it trained on scores too well",
            stacklevel=1,  # about the data, not the caller
        )
    copies = _copies(images)
    if copies:
        named = [" is ".join(os.path.relpath(path, source) for path in paths) for paths in copies]
        warnings.warn(
            f"{source}: {len(copies)} image(s) are in more than one split under other names, the same bytes "
            f"({listed(named)}); a model validated or tested on images it trained on scores too well",
            stacklevel=1,  # about the data, not the caller
        )


def _copies(images: dict[str, list[str]]) -> list[list[str]]:
    """The files with the same bytes in more than one split (each group's paths, in split order), from {a split's
    file: its image paths}. Only files whose sizes are shared by another split's are read and hashed."""
    split_of, by_size = {}, {}  # path -> its first split; size -> paths
    for split_file, paths in images.items():
        for path in map(os.path.normpath, paths):
            if path not in split_of and os.path.isfile(path):  # (a path in two splits is named as such)
                split_of[path] = split_file
                by_size.setdefault(os.path.getsize(path), []).append(path)
    by_digest = {}
    for paths in by_size.values():
        if len({split_of[path] for path in paths}) > 1:
            for path in paths:
                with open(path, "rb") as f:
                    by_digest.setdefault(hashlib.file_digest(f, "sha256").digest(), []).append(path)
    return [paths for paths in by_digest.values() if len({split_of[path] for path in paths}) > 1]
