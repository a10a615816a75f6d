"""The image files of a dataset (data/image_files.py): boxes of EXIF-turned JPEGs annotated on the stored
pixels follow the image; unreadable images are refused, named, or left out; an image that fails to decode
while training is skipped, named."""

import json
import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from deformable_detr.apps.cli import train_main
from deformable_detr.data.image_files import EXIF_ORIENTATION, turn_box
from deformable_detr.data.samples import DetectionSamples
from deformable_detr.data.sources import load_detection_dataset

STORED = (80, 48)  # width, height of the stored pixels
BOX = [10, 6, 30, 12]  # x, y, w, h of the white rectangle on them


def picture(path, orientation: int = 1):
    """A black JPEG with a white rectangle at BOX, stored as it is, with an EXIF orientation."""
    pixels = np.zeros((STORED[1], STORED[0], 3), np.uint8)
    x, y, w, h = BOX
    pixels[y : y + h, x : x + w] = 255
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, quality=98, exif=exif)


def white_box(image: Image.Image) -> list:
    """[x, y, w, h] of the white pixels."""
    ys, xs = np.nonzero(np.asarray(image.convert("L")) > 128)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_turned_boxes_cover_what_exif_transpose_shows(tmp_path, orientation):
    picture(tmp_path / "a.jpg", orientation)
    shown = ImageOps.exif_transpose(Image.open(tmp_path / "a.jpg"))
    assert turn_box(BOX, orientation, *STORED) == white_box(shown)


def coco_folder(root, images: dict, size_given: dict | None = None) -> str:
    """A Roboflow COCO folder whose train split holds `images` {file name: orientation or bytes}, each annotated
    with BOX and with the stored size (or size_given[name]); valid/ holds one plain picture."""
    for split, files in (("train", images), ("valid", {"v.jpg": 1})):
        os.makedirs(root / split, exist_ok=True)
        entries, annotations = [], []
        for i, (name, content) in enumerate(files.items()):
            if isinstance(content, bytes):
                (root / split / name).write_bytes(content)
            else:
                picture(root / split / name, content)
            width, height = (size_given or {}).get(name, STORED)
            entries.append({"id": i, "file_name": name, "width": width, "height": height})
            annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": BOX, "area": 360, "iscrowd": 0})
        coco = {"images": entries, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
        (root / split / "_annotations.coco.json").write_text(json.dumps(coco))
    return str(root)


def test_boxes_annotated_on_the_stored_pixels_of_a_turned_jpeg_follow_it(tmp_path):
    """Image 0 is turned 90 degrees by EXIF and annotated with its stored size (as COCO tools write it): its box
    and size are turned with it, so the box still covers the rectangle. Image 1 was annotated as shown (its
    size is the turned one): its box is left alone. One warning counts both."""
    folder = coco_folder(tmp_path, {"stored.jpg": 6, "shown.jpg": 6}, size_given={"shown.jpg": STORED[::-1]})
    with pytest.warns(UserWarning, match=r"2 JPEG\(s\) are turned .* 1 annotated on the stored pixels .*stored.jpg"):
        splits, _ = load_detection_dataset(folder)
    train = splits["train"]
    assert (train[0]["width"], train[0]["height"]) == STORED[::-1]
    sample = DetectionSamples(train)[0]
    assert sample["annotation"]["annotations"][0]["bbox"] == pytest.approx(white_box(sample["image"]), abs=1)
    assert train[1]["objects"]["bbox"][0] == BOX


def test_a_size_unlike_the_annotation_warns(tmp_path):
    folder = coco_folder(tmp_path, {"a.jpg": 1}, size_given={"a.jpg": (800, 480)})
    with pytest.warns(UserWarning, match=r"1 image\(s\) are not the size their annotation gives.*annotated 800x480"):
        load_detection_dataset(folder)


def test_unreadable_images_are_listed_and_refused_or_left_out(tmp_path, monkeypatch):
    """A file that is not an image and one above PIL's decompression-bomb limit: the dataset is refused with both
    named (the command says it in one line), or with skip_bad_images they are left out with one warning."""
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    folder = coco_folder(tmp_path / "data", {"good.jpg": 1, "text.jpg": b"not an image", "big.png": big.read_bytes()})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # PIL refuses twice that: 200x200 is a "bomb", 80x48 not
    with pytest.raises(ValueError, match=r"2 unreadable image\(s\): .*text.jpg \(UnidentifiedImageError.*big.png"):
        load_detection_dataset(folder)
    with pytest.raises(SystemExit, match=r"^deformable-detr-train: error: .*2 unreadable image\(s\).*--skip_bad"):
        train_main(["--dataset", folder, "--config_name", "tiny", "--output_dir", str(tmp_path / "out")])
    with pytest.warns(UserWarning, match=r"2 unreadable image\(s\) left out: .*text.jpg"):
        splits, _ = load_detection_dataset(folder, skip_bad_images=True)
    assert len(splits["train"]) == 1


def test_an_image_that_fails_to_decode_later_is_skipped_named(tmp_path, caplog):
    """The header is fine, the data is cut short: evaluation data raises naming it; training data skips it with
    a warning naming it and the next image takes its place."""
    picture(tmp_path / "a.jpg")
    cut = (tmp_path / "a.jpg").read_bytes()
    folder = coco_folder(tmp_path / "data", {"cut.jpg": cut[: len(cut) * 3 // 4], "whole.jpg": 1})
    splits, _ = load_detection_dataset(folder)
    with pytest.raises(ValueError, match=r"cut.jpg: cannot be decoded \(OSError"):
        DetectionSamples(splits["train"])[0]
    samples = DetectionSamples(splits["train"], skip_unreadable=True)
    assert white_box(samples[0]["image"]) == BOX and samples.skipped == 1
    assert "cut.jpg cannot be decoded" in caplog.text and "1 skip(s)" in caplog.text


def test_unreadable_images_of_a_datasets_folder_are_listed_and_left_out(tmp_path):
    """The same rule for a save_to_disk folder (images stored as bytes), its headers read one row at a time."""
    from datasets import DatasetDict

    from deformable_detr.data.schema import records_to_dataset

    picture(tmp_path / "a.jpg")
    good = {"bytes": (tmp_path / "a.jpg").read_bytes(), "path": "good.jpg"}
    bad = {"bytes": b"not an image", "path": "bad.jpg"}
    objects = {"id": [0], "area": [360.0], "bbox": [BOX], "category": [0]}
    rows = [
        {"image": image, "image_id": i, "width": 80, "height": 48, "objects": objects}
        for i, image in enumerate([good, bad, good])
    ]
    DatasetDict(
        train=records_to_dataset(rows, ["thing"]), validation=records_to_dataset(rows[:1], ["thing"])
    ).save_to_disk(str(tmp_path / "data"))
    with pytest.raises(ValueError, match=r"\[train\]: 1 unreadable image\(s\): bad.jpg \(UnidentifiedImageError"):
        load_detection_dataset(str(tmp_path / "data"))
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) left out: bad.jpg"):
        splits, _ = load_detection_dataset(str(tmp_path / "data"), skip_bad_images=True)
    assert splits["train"]["image_id"] == [0, 2]
