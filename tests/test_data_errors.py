"""Bad data is refused when it is loaded, with an error that names the file (or split), the entry, the field and
its value, never a crash deep inside nor a silently wrong dataset; and data that is legal but suspect (an image in
two splits) is named in a warning. test_data.py holds the other checks of loaded data."""

import json
import os
import re

import PIL.Image
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

from deformable_detr.data.samples import DetectionCollator, DetectionSamples
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.data.sources import load_detection_dataset
from deformable_detr.metrics.evaluation import coco_ground_truth, coco_metrics
from deformable_detr.model.image_processing_deformable_detr import DeformableDetrImageProcessor
from tests.support.datasets_on_disk import edited_coco, edited_voc, write_coco, write_voc


@pytest.fixture(scope="module")
def shapes():
    return {"train": shapes_dataset(5, 64, seed=1), "validation": shapes_dataset(3, 64, seed=2)}


def setting(entry: str, index: int, key: str, value):
    def change(coco):
        coco[entry][index][key] = value

    return change


def removing(entry: str, index: int, key: str):
    def change(coco):
        del coco[entry][index][key]

    return change


def replacing(entry: str, value, index: int | None = None):
    def change(coco):
        if index is None:
            coco[entry] = value
        else:
            coco[entry][index] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [  # each comment: what the value raises or loads as where it is not checked
        # a TypeError from os.path.join, naming nothing
        (setting("images", 2, "file_name", 5), "images[2]: file_name is 5, not a file name"),
        (setting("images", 2, "file_name", None), "images[2]: file_name is None, not a file name"),
        # "annotations[6] (id 6): image_id 102 is not in 'images'": the annotation, not the bad image id
        (setting("images", 2, "id", "abc"), "images[2]: id is 'abc', not an integer"),
        # pyarrow's "Could not convert 'abc' with type str: tried to convert to int64"
        (setting("annotations", 2, "id", "abc"), "annotations[2] (id abc): id is 'abc', not an integer"),
        # "AttributeError: 'list' object has no attribute 'get'"
        (replacing("annotations", [1, 2], index=2), "annotations[2] is [1, 2], not an object"),
        # "images[0]: needs 'id', ...": the keys of a dict read as entries
        (replacing("images", {"a": 1}), ": 'images' is {'a': 1}, not a list"),
        # "TypeError: 'NoneType' object is not iterable"
        (replacing("annotations", None), ": 'annotations' is None, not a list"),
        # "TypeError: '<' not supported between instances of 'str' and 'int'"
        (setting("categories", 1, "id", "1"), "categories[1]: id is '1', not an integer"),
        # loaded, with the class name 5
        (setting("categories", 1, "name", 5), "categories[1]: name is 5, not a class name"),
        # loaded as a crowd region (bool("0") is True), so not trained on
        (setting("annotations", 2, "iscrowd", "0"), "annotations[2] (id 2): iscrowd is '0', not 0 or 1"),
        (setting("annotations", 2, "iscrowd", 2), "annotations[2] (id 2): iscrowd is 2, not 0 or 1"),
    ],
)
def test_bad_coco_fields_are_named(shapes, tmp_path, change, message):
    root, path = edited_coco(shapes["train"], tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(f"{path}{'' if message.startswith(':') else ', '}{message}")):
        load_detection_dataset(root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            setting("annotations", 2, "bbox", "1,2,3,4"),
            "annotations[2] (id 2): bbox must be [x, y, w, h], got '1,2,3,4'",
        ),
        (
            setting("annotations", 2, "bbox", [1, 2, 3]),
            "annotations[2] (id 2): bbox must be [x, y, w, h], got [1, 2, 3]",
        ),
        (setting("annotations", 2, "image_id", 9999), "annotations[2] (id 2): image_id 9999 is not in 'images'"),
        (setting("annotations", 2, "category_id", "1"), "annotations[2] (id 2): category_id is '1', not an integer"),
        (removing("annotations", 2, "category_id"), "annotations[2] (id 2): category_id is None, not an integer"),
        (removing("images", 2, "file_name"), "images[2]: needs 'id', 'file_name', 'width' and 'height'; ['file_name']"),
    ],
)
def test_bad_coco_references_and_types_are_named(shapes, tmp_path, change, message):
    """A bad bbox, an image_id or category_id that is missing, of another type or not in the file, and an image
    without a file_name: named with the entry and its id."""
    root, path = edited_coco(shapes["train"], tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(f"{path}, {message}")):
        load_detection_dataset(root)


@pytest.mark.parametrize(
    ("pattern", "replacement", "message"),
    [
        # unchecked, each of the first five is "not a readable Pascal VOC annotation (needs size/width, ...):
        # 'NoneType' object has no attribute 'strip'" (or 'findtext', or "float() argument must be a string or a
        # real number, not 'NoneType'"), naming neither the object nor the element
        ("<name>[^<]*</name>", "", ", object 0: no <name>"),
        ("<bndbox>.*?</bndbox>", "", ", object 0 ('square'): no <bndbox>"),
        ("<xmax>[^<]*</xmax>", "", ", object 0 ('square'): no <xmax>"),
        ("<size>.*?</size>", "", ": no <size>"),
        ("<width>[^<]*</width>", "", ", size: no <width>"),
        # unchecked: loaded as a class named ''
        ("<name>[^<]*</name>", "<name> </name>", ", object 0: <name> is empty"),
        # unchecked: loaded, as any value of <difficult> is
        (
            "<difficult>0</difficult>",
            "<difficult>yes</difficult>",
            ", object 0 ('square'): difficult is 'yes', not 0 or 1",
        ),
    ],
)
def test_bad_voc_elements_are_named(shapes, tmp_path, pattern, replacement, message):
    root, path = edited_voc(shapes["train"], tmp_path, pattern, replacement)
    with pytest.raises(ValueError, match=re.escape(f"{path}{message}")):
        load_detection_dataset(root)


def test_coco_ids_written_as_whole_floats_are_integers(shapes, tmp_path):
    """pandas may write ids as 1.0: whole floats are taken as the integers they hold, and load as int ids do."""

    def as_floats(coco):
        for key, fields in (
            ("images", ["id"]),
            ("annotations", ["id", "image_id", "category_id"]),
            ("categories", ["id"]),
        ):
            for entry in coco[key]:
                entry.update({field: float(entry[field]) for field in fields})

    plain, _ = load_detection_dataset(edited_coco(shapes["train"], tmp_path / "plain", lambda coco: None)[0])
    floats, _ = load_detection_dataset(edited_coco(shapes["train"], tmp_path / "floats", as_floats)[0])
    for split in ("train", "validation"):
        assert (
            floats[split].select_columns(["image_id", "objects"]).to_list()
            == plain[split].select_columns(["image_id", "objects"]).to_list()
        )


@pytest.mark.parametrize("flag, crowd", [("1", 1), ("True", 1), ("false", 0)])
def test_voc_difficult_flags_as_words(shapes, tmp_path, flag, crowd):
    root, _ = edited_voc(shapes["train"], tmp_path, "<difficult>0</difficult>", f"<difficult>{flag}</difficult>")
    splits, _ = load_detection_dataset(root, validation_fraction=0.4)
    crowds = [c for split in splits.values() for o in split["objects"] for c in o["iscrowd"]]
    assert sorted(crowds)[-1] == crowd


def test_voc_difficult_objects_are_ignored_like_crowd_regions(shapes, tmp_path):
    """Difficult objects are crowd regions: kept in the data, left out of the training labels, and a detection on
    one is neither a hit nor a false positive."""
    root = write_voc({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path))
    path = os.path.join(root, "Annotations", "val_000.xml")
    with open(path) as f:
        xml = f.read().replace("<difficult>0</difficult>", "<difficult>1</difficult>", 1)
    with open(path, "w") as f:
        f.write(xml)
    splits, names = load_detection_dataset(root)
    validation = splits["validation"]
    counts = [len(o["bbox"]) for o in validation["objects"]]
    assert [o["iscrowd"] for o in validation["objects"]] == [[1] + [0] * (counts[0] - 1)] + [
        [0] * n for n in counts[1:]
    ]
    assert not any(1 in o["iscrowd"] for o in splits["train"]["objects"])
    samples = DetectionSamples(validation)
    batch = DetectionCollator(DeformableDetrImageProcessor())([samples[i] for i in range(len(samples))])
    assert [len(labels["class_labels"]) for labels in batch["labels"]] == [counts[0] - 1, *counts[1:]]  # not trained on
    truth = coco_ground_truth(validation, names)
    assert [a["iscrowd"] for a in truth["annotations"]] == [1] + [0] * (sum(counts) - 1)
    exact = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in truth["annotations"]
    ]
    metrics = coco_metrics(truth, exact)
    assert metrics["map"] == pytest.approx(1.0)  # the detection on the difficult object is no false positive
    assert sum(c["objects"] for c in metrics["per_class"].values()) == sum(counts) - 1  # nor an object to find
    assert coco_metrics(truth, exact[1:])["map"] == pytest.approx(1.0)  # so missing it is no miss


def test_voc_training_split_of_difficult_objects_only_is_refused(shapes, tmp_path):
    root = write_voc({"train": shapes["train"]}, CLASS_NAMES, str(tmp_path))
    for name in os.listdir(os.path.join(root, "Annotations")):
        path = os.path.join(root, "Annotations", name)
        with open(path) as f:
            xml = f.read().replace("<difficult>0</difficult>", "<difficult>1</difficult>")
        with open(path, "w") as f:
            f.write(xml)
    with pytest.raises(ValueError, match="has no boxes in its training split: .* VOC's difficult objects are not"):
        load_detection_dataset(root)


def test_images_in_two_voc_splits_are_named(shapes, tmp_path):
    """train_000 and train_001 in val.txt too: loaded as listed, with a warning naming the two listings and images
    (validation would score on training images)."""
    root = write_voc({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path))
    with open(os.path.join(root, "ImageSets", "Main", "val.txt"), "a") as f:
        f.write("train_000\ntrain_001\n")
    with pytest.warns(UserWarning, match="more than one split") as caught:
        splits, _ = load_detection_dataset(root)
    assert [str(w.message) for w in caught] == [
        f"{root}: 2 image(s) are in more than one split (ImageSets/Main/train.txt and ImageSets/Main/val.txt share "
        "2: train_000.jpg, train_001.jpg); a model validated or tested on images it trained on scores too well"
    ]
    assert (len(splits["train"]), len(splits["validation"])) == (5, 5)  # a warning: loaded as listed


def test_images_listed_twice_in_a_voc_split_are_read_once(shapes, tmp_path):
    """An image listed twice in a split is read once (not trained on twice an epoch nor scored twice), with a
    warning naming it."""
    root = write_voc({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path))
    listing = os.path.join(root, "ImageSets", "Main", "train.txt")
    with open(listing, "a") as f:
        f.write("train_000\ntrain_002\ntrain_000\n")
    with pytest.warns(UserWarning, match="more than once") as caught:
        splits, _ = load_detection_dataset(root)
    assert [str(w.message) for w in caught] == [
        f"{listing} lists 2 image(s) more than once: train_000, train_002; each is read once"
    ]
    assert len(splits["train"]) == 5


def test_images_in_two_coco_splits_are_named(shapes, tmp_path):
    root = write_coco({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path), "instances")
    path = os.path.join(root, "annotations", "instances_val.json")
    with open(path) as f:
        coco = json.load(f)
    coco["images"][0]["file_name"] = "../train/train_003.jpg"
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.warns(UserWarning, match="more than one split") as caught:
        load_detection_dataset(root)
    assert str(caught[0].message).startswith(
        f"{root}: 1 image(s) are in more than one split (annotations/instances_train.json and "
        "annotations/instances_val.json share 1: train_003.jpg)"
    )


BOXES = List(List(Value("float32"), length=4))
CATS_DOGS = List(ClassLabel(names=["cat", "dog"]))


def saved_dataset(root, **splits) -> str:
    """A save_to_disk folder of two-image splits: {split name: (`objects` feature or None, one image's objects)}."""
    image = PIL.Image.new("RGB", (40, 30))
    parts = {}
    for name, (objects, row) in splits.items():
        if objects is None:
            parts[name] = Dataset.from_dict({"image": [image] * 2}, features=Features({"image": Image()}))
        else:
            features = Features({"image": Image(), "objects": objects})
            parts[name] = Dataset.from_dict({"image": [image] * 2, "objects": [row] * 2}, features=features)
    DatasetDict(parts).save_to_disk(str(root))
    return str(root)


GOOD = ({"bbox": BOXES, "category": CATS_DOGS}, {"bbox": [[1, 2, 10, 5]], "category": [1]})


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        # loaded; a KeyError at the first validation batch
        (
            {"train": GOOD, "validation": (None, None)},
            "[validation]: a detection dataset needs the columns 'image' and 'objects', got ['image']",
        ),
        (
            {"train": GOOD, "validation": ({"category": CATS_DOGS}, {"category": [1]})},
            "[validation]: 'objects' lacks ['bbox']; the schema's objects have 'bbox' (COCO x, y, w, h in pixels)",
        ),
        # "TypeError: can only concatenate str (not "int") to str"
        (
            {
                "train": (
                    {"bbox": BOXES, "category": List(Value("string"))},
                    {"bbox": [[1, 2, 3, 4]], "category": ["cat"]},
                )
            },
            "[train]: a category of 'objects.category' is Value('string'), not a ClassLabel (the class names) nor an "
            "integer class id",
        ),
        # "TypeError: 'float' object cannot be interpreted as an integer"
        (
            {
                "train": (
                    {"bbox": BOXES, "category": List(Value("float32"))},
                    {"bbox": [[1, 2, 3, 4]], "category": [1.0]},
                )
            },
            "[train]: a category of 'objects.category' is Value('float32'), not a ClassLabel",
        ),
        # loaded: validation's class 0, 'dog', scored as the model's class 0, 'cat'
        (
            {
                "train": GOOD,
                "validation": ({"bbox": BOXES, "category": List(ClassLabel(names=["dog", "cat"]))}, GOOD[1]),
            },
            "[validation]: its classes ['dog', 'cat'] are not its train split's ['cat', 'dog'] (in that order)",
        ),
        # loaded: validation's id 7 beside train's two classes, an IndexError when scored
        (
            {
                "train": GOOD,
                "validation": (
                    {"bbox": BOXES, "category": List(Value("int64"))},
                    {"bbox": [[1, 2, 3, 4]], "category": [7]},
                ),
            },
            "[validation]: class id 7 is beyond the train split's 2 classes (cat, dog)",
        ),
        # "ValueError: too many values to unpack (expected 4)"
        (
            {
                "train": (
                    {"bbox": List(List(Value("float32"))), "category": CATS_DOGS},
                    {"bbox": [[1, 2, 3, 4, 5]], "category": [1]},
                )
            },
            "[train]: row 0 has a box of 5 numbers in 'objects.bbox'; a box is 4 numbers (COCO x, y, w, h in pixels)",
        ),
        # "TypeError: cannot unpack non-iterable float object"
        (
            {
                "train": (
                    {"bbox": List(Value("float32")), "category": CATS_DOGS},
                    {"bbox": [1, 2, 3, 4], "category": [1]},
                )
            },
            "[train]: a box of 'objects.bbox' is Value('float32'), not 4 numbers (COCO x, y, w, h in pixels)",
        ),
        # "TypeError: can't multiply sequence by non-int of type 'str'"
        (
            {
                "train": (
                    {"bbox": List(List(Value("string"))), "category": CATS_DOGS},
                    {"bbox": [list("1234")], "category": [1]},
                )
            },
            "[train]: a box of 'objects.bbox' is List(Value('string')), not 4 numbers",
        ),
    ],
)
def test_datasets_folders_are_checked_against_the_schema_when_loaded(tmp_path, splits, message):
    root = saved_dataset(tmp_path, **splits)
    with pytest.raises(ValueError, match=re.escape(f"{root} {message}")):
        load_detection_dataset(root)


def test_box_lengths_are_read_in_either_storage_of_objects(tmp_path):
    """Objects as a list of dicts, boxes of open length: the bad box is found in the second row, and without it
    the boxes load."""
    objects = List({"bbox": List(Value("float32")), "category": ClassLabel(names=["cat", "dog"])})
    features = Features({"image": Image(), "objects": objects})
    image = PIL.Image.new("RGB", (40, 30))
    rows = [
        [{"bbox": [1, 2, 10, 5], "category": 1}],
        [{"bbox": [1, 2, 3, 4], "category": 0}, {"bbox": [1, 2, 3], "category": 0}],
    ]
    Dataset.from_dict({"image": [image] * 2, "objects": rows}, features=features).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad'} [train]: row 1 has a box of 3 numbers")):
        load_detection_dataset(str(tmp_path / "bad"))
    rows[1].pop()
    Dataset.from_dict({"image": [image] * 2, "objects": rows}, features=features).save_to_disk(str(tmp_path / "good"))
    splits, _ = load_detection_dataset(str(tmp_path / "good"), validation_fraction=0.5)
    boxes = sorted(o["bbox"] for split in splits.values() for objects in split["objects"] for o in objects)
    assert boxes == [[1, 2, 3, 4], [1, 2, 10, 5]]


def test_a_split_of_bare_images_beside_train_and_validation_is_left_out(tmp_path):
    """A test split without annotations, as some Hub datasets have: nothing trains on it or can score it, so it
    is left out with a warning and the other splits load."""
    root = saved_dataset(tmp_path, train=GOOD, validation=GOOD, test=(None, None))
    with pytest.warns(UserWarning, match="no 'objects'") as caught:
        splits, names = load_detection_dataset(root)
    assert [str(w.message) for w in caught] == [
        f"{root}: the split(s) ['test'] have no 'objects' (no annotations), so they are left out"
    ]
    assert sorted(splits) == ["train", "validation"] and names == ["cat", "dog"]
