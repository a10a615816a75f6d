import json
import os
import re
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import PIL.Image
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

from deformable_detr.data.samples import DetectionCollator, DetectionSamples
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.data.sources import dataset_format, load_detection_dataset
from deformable_detr.data.transforms import DetrAugmentation
from deformable_detr.engine import TrainingOptions
from deformable_detr.model.image_processing_deformable_detr import DeformableDetrImageProcessor
from tests.support.bccd import BCCD, BCCD_FULL
from tests.support.datasets_on_disk import edited_coco, edited_voc, write_coco, write_imagefolder, write_voc


@pytest.fixture(scope="module")
def shapes():
    return {"train": shapes_dataset(5, 64, seed=1), "validation": shapes_dataset(3, 64, seed=2)}


def same_objects(loaded, original):
    assert len(loaded) == len(original)
    for a, b in zip(loaded, original):
        assert a["objects"]["category"] == b["objects"]["category"]
        np.testing.assert_allclose(a["objects"]["bbox"], b["objects"]["bbox"], atol=1e-6)
        assert a["image"].size == b["image"].size


@pytest.mark.parametrize("layout", ["roboflow", "instances"])
def test_coco_folder(shapes, tmp_path, layout):
    names = ("train", "valid") if layout == "roboflow" else ("train2017", "val2017")  # COCO's own names
    root = write_coco(dict(zip(names, (shapes["train"], shapes["validation"]))), CLASS_NAMES, str(tmp_path), layout)
    assert dataset_format(root) == "coco"
    splits, names = load_detection_dataset(root)
    assert names == CLASS_NAMES  # Roboflow's supercategory-only category is left out
    same_objects(splits["train"], shapes["train"])
    same_objects(splits["validation"], shapes["validation"])
    assert splits["train"].features["objects"]["category"].feature.names == CLASS_NAMES


def test_voc_folder(shapes, tmp_path):
    root = write_voc({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path))
    assert dataset_format(root) == "voc"
    splits, names = load_detection_dataset(root)
    assert names == sorted(CLASS_NAMES)
    remap = [sorted(CLASS_NAMES).index(n) for n in CLASS_NAMES]
    for a, b in zip(splits["train"], shapes["train"]):
        assert a["objects"]["category"] == [remap[c] for c in b["objects"]["category"]]
        np.testing.assert_allclose(a["objects"]["bbox"], b["objects"]["bbox"])


def test_save_to_disk_folder_and_validation_split(tmp_path):
    DatasetDict(train=shapes_dataset(20, 32, seed=3)).save_to_disk(str(tmp_path))
    assert dataset_format(str(tmp_path)) == "save_to_disk"
    splits, names = load_detection_dataset(str(tmp_path), validation_fraction=0.25, seed=0)
    assert names == CLASS_NAMES
    assert (len(splits["train"]), len(splits["validation"])) == (15, 5)
    again, _ = load_detection_dataset(str(tmp_path), validation_fraction=0.25, seed=0)
    assert again["validation"]["image_id"] == splits["validation"]["image_id"]
    # the defaults hold out what a training run with default options holds out
    defaults = TrainingOptions(dataset=str(tmp_path), config_name="tiny")
    held_out, _ = load_detection_dataset(str(tmp_path), defaults.validation_fraction, defaults.seed)
    assert load_detection_dataset(str(tmp_path))[0]["validation"]["image_id"] == held_out["validation"]["image_id"]


def test_objects_as_a_list_of_dicts(tmp_path):
    """The other way datasets stores objects: one dict per object, here without areas."""
    features = Features(
        {
            "image": Image(),
            "objects": List({"bbox": List(Value("float32"), length=4), "category": ClassLabel(names=["cat", "dog"])}),
        }
    )
    image = PIL.Image.new("RGB", (40, 30))
    rows = {"image": [image, image], "objects": [[{"bbox": [1, 2, 10, 5], "category": 1}], []]}
    DatasetDict(
        train=Dataset.from_dict(rows, features=features), test=Dataset.from_dict(rows, features=features)
    ).save_to_disk(str(tmp_path))
    splits, names = load_detection_dataset(str(tmp_path), validation_fraction=0.5)
    assert names == ["cat", "dog"] and set(splits) == {"train", "validation", "test"}
    sample = DetectionSamples(splits["test"])[0]
    assert sample["annotation"]["annotations"] == [
        {"bbox": [1, 2, 10, 5], "category_id": 1, "area": 50.0, "iscrowd": 0}
    ]


def test_folder_that_datasets_reads(shapes, tmp_path):
    """Like a Hub id: load_dataset reads it; plain integer categories get numbered names, with a warning."""
    root = write_imagefolder(shapes["train"], CLASS_NAMES, str(tmp_path))
    assert dataset_format(root) == "load_dataset"
    with pytest.warns(UserWarning, match="not a ClassLabel"):
        splits, names = load_detection_dataset(root, validation_fraction=0.4)
    assert names == ["0", "1", "2"]
    assert len(splits["train"]) + len(splits["validation"]) == 5


def test_bccd_subset():
    """The vendored 13 images: the full set's splits, and every box but the one of zero area in 00338 and 00343."""
    with pytest.warns(UserWarning, match="BloodImage_00338.xml: box .* has no area"):
        splits, names = load_detection_dataset(BCCD)
    assert names == ["Platelets", "RBC", "WBC"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "validation": 3, "test": 2}
    assert sum(len(o["bbox"]) for s in splits.values() for o in s["objects"]) == 225 - 2
    val = {row["image_id"]: row for row in splits["validation"]}
    assert sorted(len(row["objects"]["bbox"]) for row in val.values()) == sorted(
        len(ET.parse(BCCD / "Annotations" / f"{name}.xml").findall("object")) - (name == "BloodImage_00338")
        for name in ("BloodImage_00000", "BloodImage_00002", "BloodImage_00338")
    )


@pytest.mark.skipif(
    not BCCD_FULL.is_dir(), reason=f"the full BCCD set is not at {BCCD_FULL} (only beside this project's CI)"
)
def test_bccd():
    with pytest.warns(UserWarning, match="BloodImage_00338.xml: box .* has no area"):
        splits, names = load_detection_dataset(BCCD_FULL)
    assert names == ["Platelets", "RBC", "WBC"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 205, "validation": 87, "test": 72}
    # 4,888 boxes in the README, two of them without area
    assert sum(len(o["bbox"]) for s in splits.values() for o in s["objects"]) == 4886


def test_bad_coco_files_are_named(shapes, tmp_path):
    root = write_coco({"train": shapes["train"]}, CLASS_NAMES, str(tmp_path), "instances")
    path = os.path.join(root, "annotations", "instances_train.json")
    coco = json.load(open(path))
    coco["annotations"][2]["category_id"] = 77
    json.dump(coco, open(path, "w"))
    with pytest.raises(ValueError, match=r"instances_train.json, annotations\[2\].*category_id 77"):
        load_detection_dataset(root)
    os.remove(os.path.join(root, "train", coco["images"][0]["file_name"]))
    coco["annotations"][2]["category_id"] = 1
    json.dump(coco, open(path, "w"))
    with pytest.raises(FileNotFoundError, match="train_000.jpg"):
        load_detection_dataset(root)
    with pytest.raises(FileNotFoundError, match="dataset ./no/such/folder: no such folder"):
        load_detection_dataset("./no/such/folder")


def test_clashing_coco_categories_are_named(shapes, tmp_path):
    """An id with two names, or a name with two ids, is refused naming the file and the id or name (one id, one
    name), as is a category without an id or a name."""
    root = write_coco(
        {"train": shapes["train"], "valid": shapes["validation"]}, CLASS_NAMES, str(tmp_path), "instances"
    )
    train_path, valid_path = (os.path.join(root, "annotations", f"instances_{s}.json") for s in ("train", "valid"))
    train_file = json.load(open(train_path))
    valid_file = json.load(open(valid_path))
    first = train_file["categories"][0]
    cases = [
        (
            train_file | {"categories": [*train_file["categories"], first | {"name": "other"}]},
            valid_file,
            rf"instances_train.json: category id {first['id']} is 'other' here and '{first['name']}' in .*one id, one",
        ),
        (
            train_file,
            valid_file | {"categories": [c | {"name": c["name"] + "_v"} for c in valid_file["categories"]]},
            rf"instances_valid.json: category id {first['id']} is '{first['name']}_v' here and '{first['name']}' in",
        ),
        (
            train_file | {"categories": [*train_file["categories"], first | {"id": 99}]},
            valid_file,
            rf"the class '{first['name']}' has the category ids \[{first['id']}, 99\]; one name, one id",
        ),
        (
            train_file | {"categories": [{"id": 5}]},
            valid_file,
            "every entry of 'categories' needs an 'id' and a 'name'",
        ),
    ]
    for train_coco, valid_coco, message in cases:
        json.dump(train_coco, open(train_path, "w"))
        json.dump(valid_coco, open(valid_path, "w"))
        with pytest.raises(ValueError, match=message):
            load_detection_dataset(root)


def test_an_empty_split_is_named(shapes, tmp_path):
    """An empty val.txt is refused as a validation split of no images, not scored "n/a" nor a best model chosen on."""
    root = write_voc({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path))
    open(os.path.join(root, "ImageSets", "Main", "val.txt"), "w").close()
    with pytest.raises(ValueError, match="its validation split has no images; give it some, or leave it out"):
        load_detection_dataset(root)


def test_bad_voc_annotation_is_named(shapes, tmp_path):
    root = write_voc({"train": shapes["train"]}, CLASS_NAMES, str(tmp_path))
    with open(os.path.join(root, "Annotations", "train_001.xml"), "w") as f:
        f.write("<annotation><size><width>64</width></size>")
    with pytest.raises(ValueError, match="train_001.xml: not a readable Pascal VOC annotation"):
        load_detection_dataset(root)


def test_samples_and_collator(shapes):
    augmented = DetectionSamples(shapes["train"], DetrAugmentation(64, 107), seed=5)
    first = augmented[1]
    again = augmented[1]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(again["image"]))  # seeded by (seed, epoch, index)
    sizes = set()
    for epoch in range(20):
        augmented.set_epoch(epoch)
        sizes.add(augmented[1]["image"].size)
    assert len(sizes) > 1
    plain = DetectionSamples(shapes["train"])
    batch = DetectionCollator(DeformableDetrImageProcessor(size={"shortest_edge": 64, "longest_edge": 107}))(
        [plain[0], plain[3]]
    )
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    assert batch["orig_sizes"].tolist() == [[64, 64], [64, 64]]
    objects = shapes["train"][3]["objects"]
    x, y, w, h = np.asarray(objects["bbox"]).T / 64
    np.testing.assert_allclose(
        batch["labels"][1]["boxes"].numpy(), np.stack([x + w / 2, y + h / 2, w, h], 1), atol=1e-6
    )
    assert batch["labels"][1]["class_labels"].tolist() == objects["category"]
    assert int(batch["labels"][1]["image_id"]) == 3


def test_label_boxes_are_relative_to_each_image_not_the_padded_canvas():
    """A box over the whole of a 64x64 image, batched with a 64x96 one: (0.5, 0.5, 1, 1), as the model predicts."""
    whole = {"image_id": 0, "annotations": [{"bbox": [0, 0, 64, 64], "category_id": 0, "area": 4096, "iscrowd": 0}]}
    wide = {"image_id": 1, "annotations": [{"bbox": [48, 16, 48, 32], "category_id": 1, "area": 1536, "iscrowd": 0}]}
    samples = [
        {"image": PIL.Image.new("RGB", (64, 64)), "annotation": whole},
        {"image": PIL.Image.new("RGB", (96, 64)), "annotation": wide},
    ]
    batch = DetectionCollator(DeformableDetrImageProcessor(do_resize=False))(samples)
    assert batch["pixel_values"].shape == (2, 3, 64, 96)
    np.testing.assert_allclose(batch["labels"][0]["boxes"].numpy(), [[0.5, 0.5, 1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(batch["labels"][1]["boxes"].numpy(), [[0.75, 0.5, 0.5, 0.5]], atol=1e-6)


def test_crowd_regions_are_kept_for_evaluation_only(shapes, tmp_path):
    from deformable_detr.metrics.evaluation import coco_ground_truth, coco_metrics

    root = write_coco({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path), "instances")
    path = os.path.join(root, "annotations", "instances_val.json")
    coco = json.load(open(path))
    crowd = coco["annotations"][0] | {"id": 999, "iscrowd": 1, "bbox": [0, 0, 20, 20]}
    coco["annotations"].append(crowd)
    json.dump(coco, open(path, "w"))
    splits, names = load_detection_dataset(root)
    image = [i for i, image_id in enumerate(splits["validation"]["image_id"]) if image_id == crowd["image_id"]][0]
    assert splits["validation"][image]["objects"]["iscrowd"][-1] == 1
    batch = DetectionCollator(DeformableDetrImageProcessor())([DetectionSamples(splits["validation"])[image]])
    assert (
        len(batch["labels"][0]["class_labels"]) == len(splits["validation"][image]["objects"]["bbox"]) - 1
    )  # not trained on
    truth = coco_ground_truth(splits["validation"], names)
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in truth["annotations"]
    ]  # the crowd region too: ignored, not a false positive
    metrics = coco_metrics(truth, detections)
    assert metrics["map"] == pytest.approx(1.0)
    assert sum(c["objects"] for c in metrics["per_class"].values()) == len(truth["annotations"]) - 1


def test_duplicate_coco_image_ids_are_refused(shapes, tmp_path):
    """Two entries with one id would share their boxes: images[5] would get the boxes of images[1]."""

    def change(coco):
        coco["images"].append(coco["images"][1] | {"file_name": coco["images"][2]["file_name"]})

    root, _ = edited_coco(shapes["train"], tmp_path, change)
    with pytest.raises(ValueError, match=r"instances_train.json: images\[1\] and images\[5\] have the same id 101"):
        load_detection_dataset(root)


@pytest.mark.parametrize(
    ("entry", "key", "value", "message"),
    [
        ("annotations", ("bbox", 2), float("inf"), "annotations[2] (id 2): bbox[2] is inf, not a finite number"),
        ("annotations", ("bbox", 0), float("nan"), "annotations[2] (id 2): bbox[0] is nan, not a finite number"),
        ("annotations", ("bbox", 3), "100", "annotations[2] (id 2): bbox[3] is '100', not a finite number"),
        ("annotations", ("bbox", 1), "abc", "annotations[2] (id 2): bbox[1] is 'abc', not a finite number"),
        ("images", ("width",), None, "images[2]: width is None, not a finite number"),
        ("images", ("height",), "64", "images[2]: height is '64', not a finite number"),
        ("images", ("width",), float("inf"), "images[2]: width is inf, not a finite number"),
    ],
)
def test_coco_numbers_must_be_finite(shapes, tmp_path, entry, key, value, message):
    def change(coco):
        *parents, last = key
        target = coco[entry][2]
        for k in parents:
            target = target[k]
        target[last] = value

    root, _ = edited_coco(shapes["train"], tmp_path, change)
    with pytest.raises(ValueError, match=re.escape(f"instances_train.json, {message}")):
        load_detection_dataset(root)


@pytest.mark.parametrize(
    ("tag", "value", "message"),
    [
        ("xmax", "inf", "object 0 ('square'): xmax is inf, not a finite number"),
        ("ymin", "nan", "object 0 ('square'): ymin is nan, not a finite number"),
        ("xmin", "abc", "object 0 ('square'): xmin is 'abc', not a finite number"),
        ("width", "inf", "size: width is inf, not a finite number"),
        ("height", "x", "size: height is 'x', not a finite number"),
    ],
)
def test_voc_numbers_must_be_finite(shapes, tmp_path, tag, value, message):
    root, _ = edited_voc(shapes["train"], tmp_path, f"<{tag}>[^<]*</{tag}>", f"<{tag}>{value}</{tag}>")
    with pytest.raises(ValueError, match=re.escape(f"train_000.xml, {message}")):
        load_detection_dataset(root)


def test_training_split_without_boxes_is_refused(shapes, tmp_path):
    root = write_coco({"train": shapes["train"], "val": shapes["validation"]}, CLASS_NAMES, str(tmp_path), "instances")
    path = os.path.join(root, "annotations", "instances_train.json")
    coco = json.load(open(path))
    first_image = coco["images"][0]["id"]
    json.dump(coco | {"annotations": [a for a in coco["annotations"] if a["image_id"] != first_image]}, open(path, "w"))
    splits, _ = load_detection_dataset(root)  # an image without objects beside others: a negative example
    assert [len(o["bbox"]) for o in splits["train"]["objects"]][0] == 0
    json.dump(coco | {"annotations": [a | {"iscrowd": 1} for a in coco["annotations"]]}, open(path, "w"))
    with pytest.raises(ValueError, match=f"{re.escape(root)} has no boxes in its training split"):
        load_detection_dataset(root)  # crowd regions are not trained on
    json.dump(coco | {"annotations": []}, open(path, "w"))
    with pytest.raises(ValueError, match=f"{re.escape(root)} has no boxes in its training split"):
        load_detection_dataset(root)
    empty = shapes["train"].map(lambda e: {"objects": {k: [] for k in e["objects"]}})
    DatasetDict(train=empty).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="saved has no boxes in its training split: none of its 4 images"):
        load_detection_dataset(str(tmp_path / "saved"))


def test_the_splits_are_checked_after_validation_fraction_makes_one(shapes, tmp_path):
    """The training split's boxes are checked after validation_fraction takes its share: where the one image with
    objects went to validation the load is refused saying so; a validation split without objects is warned of, and
    a share that leaves no training image is refused in our words."""
    two = shapes["train"].select(range(2))
    held_out = two.train_test_split(test_size=0.5, seed=0)["test"]["image_id"][0]
    one_labelled = two.map(lambda e: e if e["image_id"] == held_out else {"objects": {k: [] for k in e["objects"]}})
    DatasetDict(train=one_labelled).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(ValueError, match="no boxes in its training split: .*all went to the validation split"):
        load_detection_dataset(str(tmp_path / "one"), validation_fraction=0.5, seed=0)
    # a validation split without objects: every metric n/a, named in a warning
    DatasetDict(
        train=shapes["train"],
        validation=shapes["validation"].select(range(1)).map(lambda e: {"objects": {k: [] for k in e["objects"]}}),
    ).save_to_disk(str(tmp_path / "blank"))
    with pytest.warns(UserWarning, match="no image of its validation split has an object"):
        load_detection_dataset(str(tmp_path / "blank"))
    # a share that leaves no training image: named, with the fraction and the image count
    DatasetDict(train=shapes["train"].select(range(1))).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match=r"validation_fraction=0.5 of its 1 training image\(s\) cannot make one"):
        load_detection_dataset(str(tmp_path / "single"), validation_fraction=0.5)


def test_voc_class_names_differing_only_in_case_warn(shapes, tmp_path):
    root = write_voc({"train": shapes["train"]}, CLASS_NAMES, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_detection_dataset(root)
    path = os.path.join(root, "Annotations", "train_000.xml")
    xml = open(path).read().replace("<name>square</name>", "<name> Triangle </name>", 1)
    open(path, "w").write(xml)
    with pytest.warns(UserWarning, match="differ only in case") as caught:
        _, names = load_detection_dataset(root)
    assert names == ["Triangle", "circle", "square", "triangle"]  # two classes, kept apart
    assert str(caught[0].message).endswith(
        "'Triangle' in train_000.xml; 'triangle' in train_001.xml, train_002.xml, train_003.xml and 1 more"
    )
