"""Detection datasets in one schema (schema.py), whatever their source: `load_detection_dataset`.

Sources:

- a Hub dataset id, or a local folder that `datasets.load_dataset` reads (e.g. an imagefolder with a
  `metadata.jsonl` holding `objects`);
- a `save_to_disk` folder;
- a COCO folder (coco.py): Roboflow's `{split}/_annotations.coco.json` beside the images, or
  `annotations/instances_{split}.json` with the images in `{split}/`;
- a Pascal VOC folder (voc.py): `Annotations/*.xml`, `JPEGImages/`, `ImageSets/Main/{split}.txt`;
- a YOLO folder (yolo.py): Ultralytics' `data.yaml` with `{split}/images` + `{split}/labels` (Roboflow's export)
  or `images/{split}` + `labels/{split}`.

The first two are in the schema already, or close to it (`objects` as a list of dicts, integer categories); their
features are checked when they are loaded, every split's.

What a load converts and checks is kept in the cache (cache.py): a COCO, VOC or YOLO folder's splits as Arrow, which
every process and later run memory-maps; for the first two (Arrow already), which rows the checks left out.
"""

import logging
import os
import warnings
from collections.abc import Callable

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, LargeList, List, Value

from ..utils.local_paths import mistyped_local_path
from ..utils.messages import listed
from .cache import cached_entry, cached_result, source_key
from .coco import coco_source_files, load_coco
from .image_files import header_or_error, image_name, report_bad, shown_size, too_thin
from .objects import objects_of
from .schema import SPLIT_NAMES
from .voc import load_voc, voc_source_files
from .yolo import is_yolo, load_yolo, yolo_source_files

logger = logging.getLogger(__name__)

LISTS = (List, LargeList)
LAYOUT_NAMES = {"save_to_disk": "save_to_disk", "coco": "COCO", "voc": "Pascal VOC", "yolo": "YOLO"}
CONVERTERS = {  # layout: (its loader, the files and folders it reads)
    "coco": (load_coco, coco_source_files),
    "voc": (load_voc, voc_source_files),
    "yolo": (load_yolo, yolo_source_files),
}


def dataset_format(source: str) -> str:
    """'save_to_disk', 'coco', 'voc', 'yolo', or 'load_dataset' (Hub ids and folders that datasets reads itself).
    FileNotFoundError for a local path that is not here (with the nearest names of its folder), ValueError for
    a split folder of a dataset of a known layout (its parent is the dataset)."""
    if not os.path.isdir(source):
        if os.path.isfile(source):
            raise FileNotFoundError(f"dataset {source}: no such folder (a dataset is a folder or a Hub id)")
        if (not_here := mistyped_local_path(source, "dataset")) is not None:
            raise FileNotFoundError(not_here)
        return "load_dataset"
    kind = _layout(source)
    parent = os.path.dirname(os.path.normpath(source))
    if kind is None and (parent_kind := _layout(parent or ".")):
        raise ValueError(
            f"dataset {source}: a folder inside the {LAYOUT_NAMES[parent_kind]} dataset {parent} (one of its "
            f"splits or image folders); give {parent}, whose splits are read together"
        )
    return kind or "load_dataset"


def _layout(folder: str) -> str | None:
    """'save_to_disk', 'coco', 'voc' or 'yolo' where `folder` holds a dataset of that layout, else None."""
    entries = set(os.listdir(folder))
    if entries & {"dataset_dict.json", "state.json"}:
        return "save_to_disk"
    if {"Annotations", "JPEGImages"} <= entries:
        return "voc"
    if any(os.path.isfile(os.path.join(folder, e, "_annotations.coco.json")) for e in entries) or (
        os.path.isdir(os.path.join(folder, "annotations"))
        and any(f.startswith("instances_") for f in os.listdir(os.path.join(folder, "annotations")))
    ):
        return "coco"
    if is_yolo(folder, entries):
        return "yolo"
    return None


def _object_fields(dataset: Dataset, where: str) -> tuple[dict, bool]:
    """({"bbox": feature, "category": feature} of one object of `dataset`, whether `objects` is a list of dicts
    rather than a dict of lists). ValueError naming `where` and what the schema expects where a column or field is
    missing."""
    objects = dataset.features.get("objects")
    if objects is None or "image" not in dataset.features:
        raise ValueError(
            f"{where}: a detection dataset needs the columns 'image' and 'objects', got {sorted(dataset.features)}"
        )
    per_object = isinstance(objects, LISTS)
    fields = objects.feature if per_object else objects
    missing = [key for key in ("bbox", "category") if key not in (fields if isinstance(fields, dict) else ())]
    if missing:
        raise ValueError(
            f"{where}: 'objects' lacks {missing}; the schema's objects have 'bbox' (COCO x, y, w, h in pixels) and "
            f"'category' (a ClassLabel), got {fields}"
        )
    if per_object:
        return {key: fields[key] for key in ("bbox", "category")}, True
    for key in ("bbox", "category"):
        if not isinstance(fields[key], LISTS):
            raise ValueError(f"{where}: 'objects.{key}' is {fields[key]}, not a list with one value per object")
    return {key: fields[key].feature for key in ("bbox", "category")}, False


def _object_features(dataset: Dataset, where: str) -> dict:
    """The features of one object of `dataset`, {"bbox": ..., "category": ...}, whether `objects` is a dict of
    lists or a list of dicts. ValueError naming `where`, the column or field and what the schema expects where one
    is missing or of another type, or where a row's box is not 4 numbers (read where the features leave the
    boxes' length open)."""
    features, per_object = _object_fields(dataset, where)
    box, category = features["bbox"], features["category"]
    length = getattr(box, "length", -1)  # -1: open
    numbers = isinstance(box, LISTS) and _dtype(box.feature).startswith(("int", "uint", "float"))
    if not numbers or length not in (-1, 4):
        raise ValueError(f"{where}: a box of 'objects.bbox' is {box}, not 4 numbers (COCO x, y, w, h in pixels)")
    if not isinstance(category, ClassLabel) and not _dtype(category).startswith(("int", "uint")):
        raise ValueError(
            f"{where}: a category of 'objects.category' is {category}, not a ClassLabel (the class names) nor an "
            "integer class id"
        )
    if length == -1:
        _check_box_lengths(dataset, per_object, where)
    return features


def _check_box_lengths(dataset: Dataset, per_object: bool, where: str, batch_size: int = 10_000):
    """ValueError naming `where`, the first row and the length where a box of `dataset` is not 4 numbers long.
    `per_object`: whether `objects` is a list of dicts. Reads the boxes as Arrow arrays, never as Python lists."""
    batches = dataset.select_columns("objects").with_format("arrow").iter(batch_size=batch_size)
    for start, table in zip(range(0, len(dataset), batch_size), batches):
        objects = table.column("objects").combine_chunks()
        lists = objects if per_object else pc.struct_field(objects, "bbox")  # one list per row
        boxes = pc.list_flatten(lists)  # one entry per object
        lengths = pc.list_value_length(pc.struct_field(boxes, "bbox") if per_object else boxes).fill_null(0)
        bad = pc.indices_nonzero(pc.not_equal(lengths, 4))
        if len(bad):
            row = start + pc.list_parent_indices(lists)[bad[0].as_py()].as_py()
            raise ValueError(
                f"{where}: row {row} has a box of {lengths[bad[0].as_py()].as_py()} numbers in 'objects.bbox'; a "
                "box is 4 numbers (COCO x, y, w, h in pixels)"
            )


def _dtype(feature) -> str:
    return feature.dtype if isinstance(feature, Value) else ""


def category_names(splits: dict[str, Dataset], source: str) -> list[str]:
    """Class names of the splits of a dataset that datasets reads, from the `objects.category` ClassLabel of
    'train'; plain integer ids give '0', '1', ... with a warning. Every split's features are checked
    (`_object_features`); ValueError where a split's ClassLabel names other classes than the train split's, or its
    integer ids go beyond them."""
    categories = {name: _object_features(split, f"{source} [{name}]")["category"] for name, split in splits.items()}
    train = categories["train"]
    if isinstance(train, ClassLabel):
        for name, category in categories.items():
            if isinstance(category, ClassLabel) and category.names != train.names:
                raise ValueError(
                    f"{source} [{name}]: its classes {category.names} are not its train split's {train.names} (in "
                    "that order), so class ids would name other classes in each"
                )
        names = list(train.names)
    else:
        names = [str(i) for i in range(_largest_category(splits["train"]) + 1)]
        warnings.warn(
            f"{source}: 'objects.category' is not a ClassLabel, so the classes are named '0'..'{len(names) - 1}'",
            stacklevel=1,  # about the data set, not the caller
        )
    for name, category in categories.items():  # (train's ids are in range: its own, or its ClassLabel's)
        if (
            name != "train"
            and not isinstance(category, ClassLabel)
            and (largest := _largest_category(splits[name])) >= len(names)
        ):
            raise ValueError(
                f"{source} [{name}]: class id {largest} is beyond the train split's {len(names)} classes "
                f"({listed(names)})"
            )
    return names


def _largest_category(split: Dataset) -> int:
    """The largest class id of `split`'s objects, -1 without any."""
    return max((max(objects_of(row)["category"], default=-1) for row in split.select_columns("objects")), default=-1)


def load_detection_dataset(
    source: str,
    validation_fraction: float = 0.15,
    seed: int = 42,
    skip_bad_images: bool = False,
    image_size: int = 800,
    max_image_size: int = 1333,
) -> tuple[DatasetDict, list[str]]:
    """Any supported source -> (DatasetDict with 'train' and 'validation', and maybe 'test'; class names).
    Without a validation split, `validation_fraction` of 'train' becomes one (by `seed`; the defaults are the
    training command's, so that they hold out the images a run with default options held out). Every image's header
    is read: images missing on disk, unreadable, or whose short side is 0 pixels resized to `image_size` and
    `max_image_size` (the training command's defaults) raise an error listing them, or are left out with
    `skip_bad_images`."""
    splits, class_names = _splits_of(source, skip_bad_images, (image_size, max_image_size))
    if "train" not in splits:
        raise ValueError(f"{source} has no train split; it has {sorted(splits)}")
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:  # an empty validation split would score "n/a" and choose the "best" model on nothing
        raise ValueError(
            f"{source}: its {empty[0]} split has no images; give it some, or leave it out (without a validation "
            "split, validation_fraction of the training images becomes one)"
        )
    carved = "validation" not in splits
    if carved:
        splits["train"], splits["validation"] = _held_out(splits["train"], source, validation_fraction, seed)
    # images without objects are fine beside others, but training on none learns nothing (loss 0, metrics n/a)
    if not _has_boxes(splits["train"]):
        raise ValueError(
            f"{source} has no boxes in its training split: none of its {len(splits['train'])} images has an "
            "object to train on (crowd regions and VOC's difficult objects are not trained on)"
            + (
                "; those with objects all went to the validation split that validation_fraction made"
                if carved and _has_boxes(splits["validation"])
                else ""
            )
        )
    if not _has_boxes(splits["validation"]):
        warnings.warn(
            f"{source}: no image of its validation split has an object, so every validation metric is n/a (-1), "
            "and the best model and early stopping rest on nothing",
            stacklevel=2,
        )
    return DatasetDict(splits), class_names


def _splits_of(source: str, skip_bad_images: bool, sizes: tuple[int, int]) -> tuple[dict[str, Dataset], list[str]]:
    """({split name: rows in the schema}, class names) of `source`, whatever its layout (`dataset_format`), its
    unreadable images and those too thin to resize to `sizes` refused or, with `skip_bad_images`, left out; from
    the cache where the same source files were loaded so before."""
    kind = dataset_format(source)
    options = [kind, os.fspath(source), os.path.abspath(source), skip_bad_images, list(sizes)]
    if kind in CONVERTERS:
        load, source_files = CONVERTERS[kind]
        return _cached_splits(source_key(source_files(source), options), lambda: load(source, skip_bad_images, sizes))
    loaded = datasets.load_from_disk(source) if kind == "save_to_disk" else datasets.load_dataset(source)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict(train=loaded)
    splits = {SPLIT_NAMES.get(name, name): split for name, split in loaded.items()}
    if "train" not in splits:
        raise ValueError(f"{source} has no 'train' split; its splits are {sorted(loaded)}")
    splits = _without_unlabelled_extra_splits(splits, source)
    arrow_files = [file["filename"] for split in splits.values() for file in split.cache_files]
    in_memory = any(not split.cache_files for split in splits.values())  # (nothing on disk to key it by)
    checked = cached_result(
        None if in_memory else source_key(arrow_files, [*options, list(splits)]),
        lambda: _checked(splits, source, skip_bad_images, sizes),
    )
    return {name: _without_rows(split, checked["left_out"][name]) for name, split in splits.items()}, checked[
        "class_names"
    ]


def _cached_splits(
    key: str | None, convert: Callable[[], tuple[dict[str, Dataset], list[str]]]
) -> tuple[dict[str, Dataset], list[str]]:
    """convert() -> ({split: Dataset}, class names), run once per `key`: its splits (tables in memory, the images
    as paths) are written as Arrow files and memory-mapped from then on. Without a key or a cache, convert()
    itself, in memory."""

    def write(folder: str) -> dict:
        splits, class_names = convert()
        for name, split in splits.items():  # (save_to_disk would copy the image files in)
            with pa.OSFile(os.path.join(folder, f"{name}.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, split.data.schema) as writer:
                    writer.write_table(split.data.table)
        return {"class_names": class_names, "splits": list(splits)}

    entry = cached_entry(key, write)
    if entry is None:
        return convert()
    folder, meta = entry
    splits = {name: Dataset.from_file(os.path.join(folder, f"{name}.arrow")) for name in meta["splits"]}
    return splits, meta["class_names"]


def _checked(splits: dict[str, Dataset], source: str, skip_bad_images: bool, sizes: tuple[int, int]) -> dict:
    """{"class_names", "left_out": {split: its rows left out}} of the splits of a dataset that datasets reads
    (`category_names`, `_unreadable_rows`)."""
    return {
        "class_names": category_names(splits, source),
        "left_out": {
            name: _unreadable_rows(split, f"{source} [{name}]", skip_bad_images, sizes)
            for name, split in splits.items()
        },
    }


def _without_rows(split: Dataset, rows: list[int]) -> Dataset:
    """`split` without `rows`."""
    if not rows:
        return split
    left_out = set(rows)
    return split.select([row for row in range(len(split)) if row not in left_out])


def _held_out(train: Dataset, source: str, validation_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): `validation_fraction` of `source`'s training rows held out by `seed`, for a dataset
    without a validation split; ValueError where that fraction cannot make one and leave rows to train on."""
    if not 0 < validation_fraction < 1:
        raise ValueError(
            f"{source} has no validation split and validation_fraction={validation_fraction} cannot make one"
        )
    try:
        parts = train.train_test_split(test_size=validation_fraction, seed=seed)
    except ValueError as error:  # datasets': a split would be empty
        raise ValueError(
            f"{source} has no validation split, and validation_fraction={validation_fraction} of its "
            f"{len(train)} training image(s) cannot make one and leave some to train on ({error})"
        ) from None
    logger.info(
        "%s has no validation split: %d of its %d training images became one", source, len(parts["test"]), len(train)
    )
    return parts["train"], parts["test"]


def _has_boxes(split: Dataset, batch_size: int = 100_000) -> bool:
    """Whether some image of `split` has an object that is trained on and scored (not a crowd region: `iscrowd`
    1; a missing one is 0). Reads the objects as Arrow arrays, never as Python lists."""
    for table in split.select_columns("objects").with_format("arrow").iter(batch_size=batch_size):
        objects = table.column("objects").combine_chunks()
        per_object = not pa.types.is_struct(objects.type)  # a list of dicts, not a dict of lists
        fields = {field.name for field in (objects.type.value_type if per_object else objects.type)}
        if "iscrowd" not in fields:
            if len(_per_object(objects, "bbox", per_object)):
                return True
        elif pc.any(pc.equal(_per_object(objects, "iscrowd", per_object).fill_null(0), 0)).as_py():
            return True
    return False


def _per_object(objects: pa.Array, field: str, per_object: bool) -> pa.Array:
    """The values of `field` of every object of `objects` (one row's objects a list of dicts where `per_object`,
    else a dict of lists), one after the other."""
    if per_object:
        return pc.struct_field(pc.list_flatten(objects), field)
    return pc.list_flatten(pc.struct_field(objects, field))


def _without_unlabelled_extra_splits(splits: dict[str, Dataset], source: str) -> dict[str, Dataset]:
    """`splits` without those other than train and validation that have no `objects` (a test split of bare
    images, as some Hub datasets have), with a warning: nothing trains on them, and nothing can score them."""
    bare = [
        name
        for name, split in splits.items()
        if name not in ("train", "validation") and "objects" not in split.features
    ]
    if bare:
        warnings.warn(
            f"{source}: the split(s) {bare} have no 'objects' (no annotations), so they are left out",
            stacklevel=1,  # about the data set, not the caller
        )
    return {name: split for name, split in splits.items() if name not in bare}


def _unreadable_rows(split: Dataset, where: str, skip_bad_images: bool, sizes: tuple[int, int]) -> list[int]:
    """The rows of `split` whose image cannot be read or is too thin to resize to `sizes`: with skip_bad_images,
    to leave out; else ValueError naming them. The images are read one row at a time, their headers only."""
    undecoded = split.cast_column("image", datasets.Image(decode=False)).select_columns("image")
    bad, thin = {}, {}  # row -> why
    for row, example in enumerate(undecoded):
        header, why = header_or_error(example["image"])
        if why is not None:
            bad[row] = why
            continue
        if why := too_thin(*shown_size(*header), sizes):
            thin[row] = f"{image_name(example['image'])} ({why})"
    report_bad(list(bad.values()), "unreadable image(s)", where, skip_bad_images)
    report_bad(list(thin.values()), "image(s) too thin to resize", where, skip_bad_images)
    return sorted(bad | thin)
