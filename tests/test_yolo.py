"""YOLO folders (data/yolo.py): Ultralytics' data.yaml with `images/` and `labels/`, in Roboflow's layout and
Ultralytics' own, read into the schema with the boxes of COCO and VOC; bad label lines named by file and line."""

import os
import re
import shutil

import numpy as np
import pytest

from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from deformable_detr.data.sources import dataset_format, load_detection_dataset
from tests.support.bccd import BCCD
from tests.support.datasets_on_disk import write_yolo


@pytest.fixture(scope="module")
def shapes():
    return {"train": shapes_dataset(5, 64, seed=1), "valid": shapes_dataset(3, 64, seed=2)}


def same_boxes(loaded, original):
    assert len(loaded) == len(original)
    for a, b in zip(loaded, original):
        assert a["objects"]["category"] == b["objects"]["category"]
        np.testing.assert_allclose(a["objects"]["bbox"], b["objects"]["bbox"], atol=1e-3)


@pytest.mark.parametrize(("layout", "names_as"), [("roboflow", "list"), ("ultralytics", "dict")])
def test_yolo_folder(shapes, tmp_path, layout, names_as):
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path), layout, names_as)
    assert dataset_format(root) == "yolo"
    splits, names = load_detection_dataset(root)
    assert names == CLASS_NAMES and sorted(splits) == ["train", "validation"]
    same_boxes(splits["train"], shapes["train"])
    same_boxes(splits["validation"], shapes["valid"])
    assert splits["train"][0]["width"] == 64 and splits["train"][0]["image"].size == (64, 64)


def test_the_vendored_bccd_subset_as_yolo_loads_the_boxes_of_its_voc_annotation(tmp_path):
    """The VOC subset converted to YOLO labels (6 decimals, as Roboflow writes them): the same images, classes
    and boxes (within 0.01 pixel of 640x480)."""
    with pytest.warns(UserWarning, match="no area"):
        voc, names = load_detection_dataset(str(BCCD))
    root = write_yolo({"train": voc["train"], "valid": voc["validation"]}, names, str(tmp_path / "yolo"))
    splits, yolo_names = load_detection_dataset(root)
    assert yolo_names == names
    same_boxes(splits["train"], voc["train"])
    same_boxes(splits["validation"], voc["validation"])
    assert sum(len(o["bbox"]) for o in splits["train"]["objects"]) > 100


def test_an_image_without_a_label_file_or_with_an_empty_one_has_no_objects(shapes, tmp_path):
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path))
    os.remove(tmp_path / "train" / "labels" / "train_000.txt")
    (tmp_path / "train" / "labels" / "train_001.txt").write_text("\n")
    splits, _ = load_detection_dataset(root)
    assert [len(o["bbox"]) for o in splits["train"]["objects"]][:2] == [0, 0]
    same_boxes(splits["train"].select(range(2, 5)), shapes["train"].select(range(2, 5)))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "4 fields ('0 0.5 0.5 0.2'), not 5"),
        ("0 0.5 0.5 0.2 0.2 0.3 0.3", "7 fields ('0 0.5 0.5 0.2 0.2 0.3 0.3'), not 5"),
        ("0 0.5 abc 0.2 0.2", "'abc' is not a number"),
        ("0 0.5 nan 0.2 0.2", "cy is nan, not a finite number"),
        ("3 0.5 0.5 0.2 0.2", "class 3 is not one of the 3 classes of data.yaml (0 to 2)"),
        ("1.5 0.5 0.5 0.2 0.2", "class 1.5 is not one of the 3 classes of data.yaml (0 to 2)"),
        ("0 1.5 0.5 0.2 0.2", "the box runs outside [0, 1] (x 1.4 to 1.6, y 0.4 to 0.6)"),
        ("0 0.95 0.5 0.3 0.2", "the box runs outside [0, 1] (x 0.8 to 1.1, y 0.4 to 0.6)"),
        ("0 0.5 0.5 -0.2 0.2", "the box runs outside [0, 1]"),
    ],
)
def test_bad_label_lines_are_named_by_file_and_line(shapes, tmp_path, line, message):
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path))
    path = tmp_path / "train" / "labels" / "train_002.txt"
    path.write_text(f"1 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}, line 2: {message}")):
        load_detection_dataset(root)


def test_boxes_a_little_past_the_image_are_clipped_and_boxes_without_area_left_out(shapes, tmp_path):
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path))
    path = tmp_path / "train" / "labels" / "train_002.txt"
    path.write_text("1 0.9 0.5 0.2 0.5\n2 0.5 0.5 0 0.2\n0 0.25 0.25 0.5 0.5\n")
    with pytest.warns(UserWarning, match=re.escape(f"{path}, line 2: box [0.5, 0.4, 0.0, 0.2] has no area")):
        splits, _ = load_detection_dataset(root)
    objects = splits["train"][2]["objects"]
    assert objects["category"] == [1, 0]
    np.testing.assert_allclose(objects["bbox"], [[0.8 * 64, 0.25 * 64, 0.2 * 64, 0.5 * 64], [0, 0, 32, 32]], atol=1e-4)


@pytest.mark.parametrize(
    ("yaml", "error", "message"),
    [
        ("nc: 3\ntrain: ../train/images\n", ValueError, "data.yaml: no 'names' (the class names, a list"),
        ("names: [a, b]\nnc: 3\ntrain: ../train/images\n", ValueError, "data.yaml: nc is 3, but 'names' names 2"),
        ("names: {0: a, 2: b}\ntrain: ../train/images\n", ValueError, "data.yaml: 'names' is {0: 'a', 2: 'b'}"),
        ("names: [a, '']\ntrain: ../train/images\n", ValueError, "data.yaml: 'names' is ['a', ''], not a list"),
        ("names: [a, b, c]\ntrain: ../trian/images\n", FileNotFoundError, "data.yaml: train is '../trian/images'"),
        ("names: [a, b, c\n", ValueError, "data.yaml: not readable as YAML"),
    ],
)
def test_bad_data_yaml_is_named(shapes, tmp_path, yaml, error, message):
    root = write_yolo({"train": shapes["train"]}, CLASS_NAMES, str(tmp_path))
    (tmp_path / "data.yaml").write_text(yaml)
    with pytest.raises(error, match=re.escape(f"{tmp_path / message}")):
        load_detection_dataset(root)


def test_yolo_checks_of_the_other_formats(shapes, tmp_path):
    """Images missing on disk left out with skip_bad_images, an image in two splits named, a split folder given
    as the dataset named with its dataset."""
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path))
    shutil.copy(tmp_path / "train" / "images" / "train_001.jpg", tmp_path / "valid" / "images" / "copy.jpg")
    with pytest.warns(UserWarning, match=re.escape("1 image(s) are in more than one split under other names")):
        splits, _ = load_detection_dataset(root)
    assert len(splits["validation"]) == 4
    with pytest.raises(ValueError, match=re.escape(f"a folder inside the YOLO dataset {root} (one of its splits")):
        load_detection_dataset(os.path.join(root, "train"))


def test_a_yolo_folder_without_data_yaml_reads_classes_txt(shapes, tmp_path):
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path), "ultralytics")
    os.remove(tmp_path / "data.yaml")
    assert dataset_format(root) == "yolo"
    with pytest.raises(ValueError, match=re.escape(f"{root}: a YOLO folder needs a data.yaml naming its classes")):
        load_detection_dataset(root)
    (tmp_path / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    splits, names = load_detection_dataset(root)
    assert names == CLASS_NAMES
    same_boxes(splits["validation"], shapes["valid"])


def test_a_test_split_that_data_yaml_names_but_is_not_there_is_left_out_with_a_warning(shapes, tmp_path):
    """Roboflow writes `test: ../test/images` into exports without a test split."""
    root = write_yolo(shapes, CLASS_NAMES, str(tmp_path))
    with open(tmp_path / "data.yaml", "a") as f:
        f.write("test: ../test/images\n")
    with pytest.warns(UserWarning, match=re.escape(f"{tmp_path / 'data.yaml'}: test is '../test/images', which")):
        splits, _ = load_detection_dataset(root)
    assert sorted(splits) == ["train", "validation"]
