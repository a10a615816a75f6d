"""YOLO folders -> splits in the schema (schema.py). Ultralytics' `data.yaml` names the classes (`names`, a list or
{id: name}) and each split's images (`train`, `val`, `test`: a folder, a .txt list of images, or a list of
those); the labels are where the images are with `images` turned `labels` in the path: `{split}/images` +
`{split}/labels` as Roboflow exports them, or `images/{split}` + `labels/{split}`. Without a data.yaml those two
layouts are read as they are, the classes from `classes.txt`.

A label file holds one line per object, `class cx cy w h`, the box normalised to [0, 1] of the image as shown
(its EXIF orientation applied, as Ultralytics reads them); an image without a label file has no objects. Every
line is checked: a bad one is a ValueError naming the file and the line."""

import math
import os
import warnings

import yaml
from datasets import Dataset

from .image_files import check_images
from .objects import objects_of_boxes
from .schema import SPLIT_NAMES, keep_box, records_to_dataset, warn_of_shared_images

YAML_FILES = ("data.yaml", "data.yml")
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
TOLERANCE = 0.01  # how far past [0, 1] a box may run (export tools' rounding); it is clipped to the image
LINE = "a YOLO label line is 'class cx cy w h', the box normalised to [0, 1]"


def is_yolo(folder: str, entries: set[str]) -> bool:
    """Whether `folder` (holding `entries`) is a YOLO folder: a data.yaml, or one of the two layouts."""
    return bool(entries & set(YAML_FILES)) or bool(_layout_splits(folder, entries))


def _layout_splits(folder: str, entries: set[str]) -> dict[str, str]:
    """{split: its images folder} of the layouts `{split}/images` + `{split}/labels` and `images/{split}` +
    `labels/{split}` (split names as SPLIT_NAMES knows them)."""
    found = {}
    for split in sorted(entries & set(SPLIT_NAMES)):
        if all(os.path.isdir(os.path.join(folder, split, part)) for part in ("images", "labels")):
            found[SPLIT_NAMES[split]] = os.path.join(folder, split, "images")
    if {"images", "labels"} <= entries and os.path.isdir(os.path.join(folder, "images")):
        for split in sorted(set(os.listdir(os.path.join(folder, "images"))) & set(SPLIT_NAMES)):
            if os.path.isdir(os.path.join(folder, "labels", split)):
                found[SPLIT_NAMES[split]] = os.path.join(folder, "images", split)
    return found


def load_yolo(
    folder: str, skip_bad_images: bool = False, sizes: tuple[int, int] | None = None
) -> tuple[dict[str, Dataset], list[str]]:
    """A YOLO folder; classes in the order of their ids; images checked by `check_images` (against `sizes`,
    those they are resized to); a warning where an image is in more than one split."""
    entries = set(os.listdir(folder))
    yaml_path = next((os.path.join(folder, name) for name in YAML_FILES if name in entries), None)
    if yaml_path is None:
        class_names = _classes_txt(folder)
        sources = {
            split: (f"{folder} [{split}]", _images_in(images))
            for split, images in _layout_splits(folder, entries).items()
        }
    else:
        config = _read_yaml(yaml_path)
        class_names = _class_names(config, yaml_path)
        sources = _yaml_splits(config, yaml_path)
    warn_of_shared_images({where: images for where, images in sources.values()}, folder)
    splits, image_id = {}, 0
    for split, (where, images) in sources.items():
        records = []
        for image in images:
            labels = _read_labels(label_file(image), len(class_names))
            records.append({"image": image, "image_id": image_id, "width": None, "height": None, "objects": labels})
            image_id += 1
        records = [_in_pixels(r) for r in check_images(records, where, skip_bad_images, sizes, boxes_as_shown=True)]
        splits[split] = records_to_dataset(records, class_names)
    return splits, class_names


def yolo_source_files(folder: str) -> list[str]:
    """The files and folders a YOLO folder's splits are read from: every file of its tree but the images (its
    data.yaml, label files, lists of images), and every folder (whose modification time changes as images come
    and go)."""
    found = []
    for top, _, names in os.walk(folder):
        found.append(top)
        found += [os.path.join(top, name) for name in names if not name.lower().endswith(IMAGE_SUFFIXES)]
    return found


def label_file(image: str) -> str:
    """The label file of `image`: its path with the last `images` folder turned `labels`, ending in .txt
    (beside the image where no folder of the path is `images`)."""
    head, images, tail = image.rpartition(f"{os.sep}images{os.sep}")
    return os.path.splitext(f"{head}{os.sep}labels{os.sep}{tail}" if images else image)[0] + ".txt"


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not readable as YAML ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds {config!r}, not the keys of a YOLO dataset ('names', 'train', 'val')")
    return config


def _class_names(config: dict, path: str) -> list[str]:
    """data.yaml's `names` as a list (a list, or {0: name, 1: name, ...}); ValueError naming the file where it
    is missing, has gaps or names that are not names, or where `nc` counts another number."""
    if "names" not in config:
        raise ValueError(f"{path}: no 'names' (the class names, a list or {{id: name}})")
    names = config["names"]
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{path}: 'names' is {config['names']!r}, not a list of class names nor {{0: name, ...}}")
    if config.get("nc") is not None and config["nc"] != len(names):
        raise ValueError(f"{path}: nc is {config['nc']!r}, but 'names' names {len(names)} classes")
    return names


def _classes_txt(folder: str) -> list[str]:
    path = os.path.join(folder, "classes.txt")
    if not os.path.isfile(path):
        raise ValueError(
            f"{folder}: a YOLO folder needs a data.yaml naming its classes ('names') and splits, or a classes.txt "
            "with a class name a line"
        )
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def _yaml_splits(config: dict, path: str) -> dict[str, tuple[str, list[str]]]:
    """{split: (where, its images)} of data.yaml's train, val and test. Paths are relative to its `path` (itself
    relative to the file's folder; the file's folder where `path` is not here, as for a folder moved since).
    FileNotFoundError naming the file and key where a train or val path is not here; a test path that is not
    (Roboflow writes one for exports without a test split) leaves the test split out with a warning."""
    folder = os.path.dirname(path)
    root = os.path.join(folder, str(config.get("path") or "."))
    root = root if os.path.isdir(root) else folder
    sources = {}
    for key in ("train", "val", "test"):
        given = config.get(key) or []
        entries = [str(entry) for entry in (given if isinstance(given, list) else [given])]
        found = {entry: _split_path(root, entry) for entry in entries}
        missing = [entry for entry, split_path in found.items() if split_path is None]
        if missing and key == "test":
            warnings.warn(f"{path}: test is {missing[0]!r}, which is not here; no test split", stacklevel=1)
        elif missing:
            raise FileNotFoundError(
                f"{path}: {key} is {missing[0]!r}, which is not here (looked for {os.path.join(root, missing[0])})"
            )
        elif entries:
            sources[SPLIT_NAMES[key]] = (f"{path} [{key}]", [image for p in found.values() for image in _images_in(p)])
    if not sources:
        raise ValueError(f"{path}: names none of the splits 'train', 'val' and 'test'")
    return sources


def _split_path(root: str, entry: str) -> str | None:
    """The path a data.yaml `entry` names under `root`, None where it is not here. One starting with '../' that
    is not there is also looked for without it: Roboflow writes '../train/images' for the folder beside
    data.yaml, as Ultralytics reads it."""
    for candidate in (entry, entry.removeprefix("../")):
        if os.path.exists(os.path.join(root, candidate)):
            return os.path.normpath(os.path.join(root, candidate))
    return None


def _images_in(source: str) -> list[str]:
    """The image files of a folder (all of its tree, sorted), or those a .txt file lists one a line (relative
    to its folder)."""
    if os.path.isdir(source):
        return sorted(
            os.path.join(top, name)
            for top, _, names in os.walk(source)
            for name in names
            if name.lower().endswith(IMAGE_SUFFIXES)
        )
    with open(source) as f:
        return [os.path.normpath(os.path.join(os.path.dirname(source), line.strip())) for line in f if line.strip()]


def _read_labels(path: str, num_classes: int) -> dict:
    """{"category": [...], "bbox": [[x, y, w, h] normalised, ...]} of a label file (none where it is not here);
    ValueError naming the file and line of a bad line; boxes without area left out with a warning."""
    objects = {"category": [], "bbox": []}
    if not os.path.isfile(path):
        return objects
    with open(path) as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            category, box = _label_line(line, f"{path}, line {number}", num_classes)
            if keep_box(box, f"{path}, line {number}"):
                objects["category"].append(category)
                objects["bbox"].append(box)
    return objects


def _label_line(line: str, where: str, num_classes: int) -> tuple[int, list[float]]:
    """(class id, [x, y, w, h] normalised and clipped to [0, 1]) of one label line."""
    fields = line.split()
    if len(fields) != 5:
        raise ValueError(f"{where}: {len(fields)} fields ({line.strip()!r}), not 5; {LINE} (polygons are not read)")
    numbers = []
    for name, field in zip(("class", "cx", "cy", "w", "h"), fields):
        try:
            numbers.append(float(field))
        except ValueError:
            raise ValueError(f"{where}: {field!r} is not a number; {LINE}") from None
        if not math.isfinite(numbers[-1]):
            raise ValueError(f"{where}: {name} is {field}, not a finite number")
    category, cx, cy, w, h = numbers
    if not category.is_integer() or not 0 <= category < num_classes:
        raise ValueError(
            f"{where}: class {fields[0]} is not one of the {num_classes} classes of data.yaml (0 to {num_classes - 1})"
        )
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    if min(x0, y0, w, h) < -TOLERANCE or max(x1, y1) > 1 + TOLERANCE:
        raise ValueError(
            f"{where}: the box runs outside [0, 1] (x {x0:g} to {x1:g}, y {y0:g} to {y1:g}); {LINE} of the image's "
            "width and height"
        )
    x0, y0, x1, y1 = (min(max(value, 0.0), 1.0) for value in (x0, y0, x1, y1))
    # rounded far below a pixel: the float noise of cx - w / 2 would show in the warnings
    return int(category), [round(value, 9) for value in (x0, y0, x1 - x0, y1 - y0)]


def _in_pixels(record: dict) -> dict:
    """`record` (its size that of the image as shown) with its normalised boxes in pixels, as the schema's."""
    width, height = record["width"], record["height"]
    boxes = [[x * width, y * height, w * width, h * height] for x, y, w, h in record["objects"]["bbox"]]
    return {**record, "objects": objects_of_boxes(boxes, record["objects"]["category"])}
