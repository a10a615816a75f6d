"""Data that would load wrong or stop a run late, found when it is loaded: COCO boxes written as corners, images
missing on disk, the same photo in two splits, images too thin to resize, mistyped local folders and split folders
given as the dataset. Each is refused naming the file (or left out by name and counted with skip_bad_images), or
warned of."""

import json
import os
import re
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image

from deformable_detr.data.sources import load_detection_dataset

SIZE = (100, 80)  # width, height


def photo(path, size=SIZE, seed: int = 0):
    """A noisy RGB PNG (lossless: its bytes are the same for the same seed)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def roboflow_coco(root, splits: dict) -> str:
    """A Roboflow COCO folder: splits {split: {file name: (boxes [[a, b, c, d], ...], size)}}; each image a photo
    seeded by its place, written unless its size is None."""
    for split, images in splits.items():
        os.makedirs(root / split, exist_ok=True)
        entries, annotations = [], []
        for i, (name, (boxes, size)) in enumerate(images.items()):
            if size is not None:
                photo(root / split / name, size, seed=zlib.crc32(f"{split}/{name}".encode()))
            width, height = size or SIZE
            entries.append({"id": i, "file_name": name, "width": width, "height": height})
            for box in boxes:
                annotations.append(
                    {"id": len(annotations), "image_id": i, "category_id": 1, "bbox": box, "area": 1, "iscrowd": 0}
                )
        coco = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
        (root / split / "_annotations.coco.json").write_text(json.dumps(coco))
    return str(root)


CORNERS = [[60, 40, 90, 70], [50, 10, 95, 30], [10, 50, 40, 75], [70, 5, 85, 20]]  # x0, y0, x1, y1 in SIZE
VALID = {"v.png": ([[5, 5, 10, 10]], SIZE)}


def test_coco_boxes_written_as_corners_are_refused(tmp_path):
    """Read as (x, y, w, h), 3 of the 4 boxes run past their 100x80 image; as corners all fit: the file is
    refused as one of corners, not clipped to the image."""
    root = roboflow_coco(tmp_path, {"train": {"a.png": (CORNERS[:2], SIZE), "b.png": (CORNERS[2:], SIZE)}})
    path = os.path.join(root, "train", "_annotations.coco.json")
    with pytest.raises(ValueError, match="corners") as caught:
        load_detection_dataset(root)
    assert str(caught.value) == (
        f"{path}: 4 of its 4 boxes run past their image as COCO's [x, y, w, h] but fit it as corners [x0, y0, x1, "
        "y1] (annotations[0] (id 0): bbox [60, 40, 90, 70] on a.png, 100x80); COCO boxes are [x, y, w, h] in "
        "pixels: write [x0, y0, x1 - x0, y1 - y0]"
    )


def test_a_few_coco_boxes_past_their_image_are_not_taken_for_corners(tmp_path):
    """One box of four running past its image is a sloppy box (clipped), not a file of corners."""
    boxes = [[60, 40, 90, 70], [5, 5, 20, 10], [30, 30, 10, 10], [1, 1, 50, 50]]
    root = roboflow_coco(tmp_path, {"train": {"a.png": (boxes, SIZE)}, "valid": VALID})
    splits, _ = load_detection_dataset(root)
    assert splits["train"][0]["objects"]["bbox"] == boxes


def test_images_missing_on_disk_are_refused_or_left_out_counted(tmp_path):
    """An image listed in the COCO file but not on disk is refused by name; with skip_bad_images it is left out by
    name and counted, as an unreadable one."""
    images = {"a.png": ([[5, 5, 10, 10]], SIZE), "gone.png": ([[5, 5, 10, 10]], None), "b.png": ([], SIZE)}
    root = roboflow_coco(tmp_path, {"train": images, "valid": VALID})
    path, gone = (os.path.join(root, "train", name) for name in ("_annotations.coco.json", "gone.png"))
    with pytest.raises(FileNotFoundError) as caught:
        load_detection_dataset(root)
    assert str(caught.value) == (
        f"{path}: 1 image(s) missing on disk: {gone}; leave them out with skip_bad_images=True (--skip_bad_images)"
    )
    with pytest.warns(UserWarning, match="missing on disk") as caught:
        splits, _ = load_detection_dataset(root, skip_bad_images=True)
    assert [str(w.message) for w in caught] == [f"{path}: 1 image(s) missing on disk left out: {gone}"]
    train = splits["train"].cast_column("image", datasets.Image(decode=False))
    assert [os.path.basename(row["image"]["path"]) for row in train] == ["a.png", "b.png"]


def test_voc_images_missing_on_disk_are_left_out_counted(tmp_path):
    from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
    from tests.support.datasets_on_disk import write_voc

    root = write_voc({"train": shapes_dataset(3, 64, seed=1)}, CLASS_NAMES, str(tmp_path))
    gone = os.path.join(root, "JPEGImages", "train_001.jpg")
    os.remove(gone)
    with pytest.raises(FileNotFoundError, match=re.escape(f"[train]: 1 image(s) missing on disk: {gone}; leave")):
        load_detection_dataset(root)
    with pytest.warns(UserWarning, match=re.escape(f"[train]: 1 image(s) missing on disk left out: {gone}")):
        splits, _ = load_detection_dataset(root, skip_bad_images=True, validation_fraction=0.5)
    assert len(splits["train"]) + len(splits["validation"]) == 2


def test_the_same_photo_in_two_splits_under_other_names_is_named(tmp_path):
    """valid/b.png is a copy of train/a.png under another name: named in a warning. Every photo has the same size,
    so all of them are hashed, and only the copy is named."""
    images = {name: ([[5, 5, 10, 10]], SIZE) for name in ("a.png", "c.png", "d.png")}
    root = roboflow_coco(tmp_path, {"train": images, "valid": {"b.png": ([[1, 1, 5, 5]], SIZE), **VALID}})
    (tmp_path / "valid" / "b.png").write_bytes((tmp_path / "train" / "a.png").read_bytes())
    with pytest.warns(UserWarning, match="same bytes") as caught:
        load_detection_dataset(root)
    assert [str(w.message) for w in caught] == [
        f"{root}: 1 image(s) are in more than one split under other names, the same bytes (train/a.png is "
        "valid/b.png); a model validated or tested on images it trained on scores too well"
    ]


def test_images_too_thin_to_resize_are_refused_or_left_out_counted(tmp_path):
    """10000x20 at max_image_size 96 has a short side of 0 pixels resized (20 * 96 / 10000 rounds to 0): refused at
    load naming the file and the sizes, or left out and counted with skip_bad_images. At the defaults (the training
    command's), 2700x1 is such an image."""
    from deformable_detr.engine import TrainingOptions

    defaults = TrainingOptions(dataset="d", config_name="tiny")
    images = {"a.png": ([[5, 5, 10, 10]], SIZE), "thin.png": ([[5, 5, 10, 10]], (10000, 20))}
    root = roboflow_coco(tmp_path, {"train": images, "valid": VALID})
    path, thin = (os.path.join(root, "train", name) for name in ("_annotations.coco.json", "thin.png"))
    why = f"{thin} (10000x20: its short side is 0 pixels resized to image_size 64, max_image_size 96)"
    with pytest.raises(ValueError) as caught:
        load_detection_dataset(root, image_size=64, max_image_size=96)
    assert str(caught.value) == (
        f"{path}: 1 image(s) too thin to resize: {why}; leave them out with skip_bad_images=True (--skip_bad_images)"
    )
    with pytest.warns(UserWarning, match="too thin") as caught:
        splits, _ = load_detection_dataset(root, skip_bad_images=True, image_size=64, max_image_size=96)
    assert [str(w.message) for w in caught] == [f"{path}: 1 image(s) too thin to resize left out: {why}"]
    assert len(splits["train"]) == 1
    assert len(load_detection_dataset(root)[0]["train"]) == 2  # 20 * 1333 / 10000 = 2.7 pixels at the defaults
    Image.new("RGB", (2700, 1)).save(tmp_path / "train" / "thin.png")
    with pytest.raises(ValueError, match=re.escape("(2700x1: its short side is 0 pixels resized to image_size 800")):
        load_detection_dataset(root)
    assert (defaults.image_size, defaults.max_image_size) == (800, 1333)


def test_images_too_thin_to_resize_in_a_datasets_folder_are_left_out(tmp_path):
    from datasets import DatasetDict

    from deformable_detr.data.schema import records_to_dataset

    objects = {"id": [0], "area": [1.0], "bbox": [[0, 0, 1, 1]], "category": [0]}
    rows = [
        {"image": Image.new("RGB", size), "image_id": i, "width": size[0], "height": size[1], "objects": objects}
        for i, size in enumerate([(40, 30), (10000, 20), (40, 30)])
    ]
    DatasetDict(train=records_to_dataset(rows, ["thing"])).save_to_disk(str(tmp_path / "data"))
    with pytest.warns(UserWarning, match=re.escape("1 image(s) too thin to resize left out: <bytes> (10000x20: its")):
        splits, _ = load_detection_dataset(str(tmp_path / "data"), 0.5, skip_bad_images=True, max_image_size=96)
    assert sorted([*splits["train"]["image_id"], *splits["validation"]["image_id"]]) == [0, 2]


def test_a_mistyped_local_folder_is_named_with_the_nearest_names_at_once(tmp_path, monkeypatch):
    """data/racoon beside data/raccoon, and dta/raccoon (the parent mistyped), are named at once with the nearest
    path here, not asked of the Hub; a folder here without a close name says so. A Hub id whose parent is nothing
    here goes to the Hub."""
    from deformable_detr.data.sources import dataset_format

    monkeypatch.chdir(tmp_path)
    roboflow_coco(tmp_path / "data" / "raccoon", {"train": {"a.png": ([[5, 5, 10, 10]], SIZE)}})
    os.makedirs("data/other")
    with pytest.raises(FileNotFoundError) as caught:
        dataset_format("data/racoon")
    assert str(caught.value) == "dataset data/racoon: no such folder; did you mean data/raccoon?"
    with pytest.raises(FileNotFoundError, match=r"^dataset dta/raccoon: no such folder; did you mean data/raccoon\?$"):
        load_detection_dataset("dta/raccoon")
    with pytest.raises(FileNotFoundError, match=r"^dataset data/zebras: no such folder; data holds no folder of a"):
        dataset_format("data/zebras")
    os.makedirs("cppe-5x")
    os.makedirs("users")
    hub_ids = ("someone/raccoons", "cppe-5", "user/raccoons")
    assert [dataset_format(hub_id) for hub_id in hub_ids] == ["load_dataset"] * 3


def test_a_split_folder_given_as_the_dataset_is_named_with_its_dataset(tmp_path, monkeypatch):
    """data/raccoon/train, a split of a COCO dataset, is refused naming the dataset to give instead."""
    monkeypatch.chdir(tmp_path)
    roboflow_coco(tmp_path / "data" / "raccoon", {"train": {"a.png": ([[5, 5, 10, 10]], SIZE)}})
    with pytest.raises(ValueError) as caught:
        load_detection_dataset("data/raccoon/train")
    assert str(caught.value) == (
        "dataset data/raccoon/train: a folder inside the COCO dataset data/raccoon (one of its splits or image "
        "folders); give data/raccoon, whose splits are read together"
    )


def test_the_image_folder_of_a_voc_dataset_given_as_the_dataset_is_named_with_its_dataset(tmp_path):
    from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
    from tests.support.datasets_on_disk import write_voc

    root = write_voc({"train": shapes_dataset(2, 64, seed=1)}, CLASS_NAMES, str(tmp_path / "voc"))
    with pytest.raises(ValueError, match=re.escape(f"a folder inside the Pascal VOC dataset {root} (one of its")):
        load_detection_dataset(os.path.join(root, "JPEGImages"))


def test_training_and_evaluation_check_images_at_their_own_sizes(tmp_path):
    """The training command checks images at its --image_size / --max_image_size, evaluation at the saved
    processor's edges: a 10000x20 image resizes to a short side of 0 pixels at 64/96 and at 128/200, though not at
    the defaults, and is named at load by each."""
    from deformable_detr.apps.evaluate import evaluate_saved_model
    from deformable_detr.engine import TrainingOptions, train
    from tests.support.models import saved_detector

    images = {"a.png": ([[5, 5, 10, 10]], SIZE), "thin.png": ([[5, 5, 10, 10]], (10000, 20))}
    root = roboflow_coco(tmp_path, {"train": images, "valid": images})
    options = TrainingOptions(
        dataset=root, config_name="tiny", image_size=64, max_image_size=96, output_dir=str(tmp_path / "run")
    )
    with pytest.raises(
        ValueError, match=r"too thin to resize: .*thin\.png \(10000x20: .* image_size 64, max_image_size 96"
    ):
        train(options)
    saved_detector(tmp_path / "model")  # its processor: shortest edge 128, longest 200
    with pytest.raises(
        ValueError, match=r"too thin to resize: .*thin\.png \(10000x20: .* image_size 128, max_image_size 200"
    ):
        evaluate_saved_model(str(tmp_path / "model"), root, split="validation")
