"""The cache of loaded datasets (deformable_detr/data/cache.py): a second load is served from the Arrow files it
wrote, a changed annotation file is a new entry, two processes loading at once build it once, the image headers
are kept per file, and DEFORMABLE_DETR_DATA_CACHE=off turns it off."""

import json
import os
import subprocess
import sys
import time

import pytest
from datasets import DatasetDict
from PIL import Image

from deformable_detr.data import cache, coco, image_files, sources
from deformable_detr.data.sources import load_detection_dataset

OLD = time.time() - 60  # files older than cache.RACY_SECONDS, whose timestamps the key can trust


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_VARIABLE, str(folder))
    return folder


def write_coco(root, boxes=((2, 3, 10, 8), (5, 5, 4, 4), (1, 1, 6, 6)), when=OLD):
    """A COCO folder (annotations/instances_{train,val}.json, images in train/ and val/), one box an image, its
    files and folders dated `when`."""
    for split, ids in (("train", (0, 1)), ("val", (2,))):
        os.makedirs(root / split, exist_ok=True)
        images = [{"id": i, "file_name": f"{i}.jpg", "width": 32, "height": 24} for i in ids]
        for i in ids:
            Image.new("RGB", (32, 24), (40 * i, 90, 200)).save(root / split / f"{i}.jpg")
        annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": list(boxes[i])} for i in ids]
        coco_file = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
        os.makedirs(root / "annotations", exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco_file))
    for top, folders, files in os.walk(root):
        for name in files + folders:
            os.utime(os.path.join(top, name), (when, when))
    os.utime(root, (when, when))
    return str(root)


def test_a_second_load_is_served_from_the_cache(tmp_path, cache_folder, monkeypatch):
    root = write_coco(tmp_path / "data")
    first, names = load_detection_dataset(root)
    monkeypatch.setattr(coco, "_read_coco_file", lambda path: pytest.fail(f"{path} read again"))
    again, names_again = load_detection_dataset(root)
    assert names_again == names == ["thing"]
    assert again["train"]["objects"] == first["train"]["objects"]
    assert [row["bbox"] for row in again["validation"]["objects"]] == [[[1.0, 1.0, 6.0, 6.0]]]
    for split in again.values():  # memory-mapped from the cache's Arrow files
        assert split.cache_files and all(f["filename"].startswith(str(cache_folder)) for f in split.cache_files)


def test_a_changed_annotation_file_is_a_new_entry(tmp_path, cache_folder):
    root = write_coco(tmp_path / "data")
    assert load_detection_dataset(root)[0]["validation"]["objects"][0]["bbox"] == [[1.0, 1.0, 6.0, 6.0]]
    write_coco(tmp_path / "data", boxes=((2, 3, 10, 8), (5, 5, 4, 4), (7, 1, 6, 6)), when=OLD + 1)
    assert load_detection_dataset(root)[0]["validation"]["objects"][0]["bbox"] == [[7.0, 1.0, 6.0, 6.0]]
    assert len([entry for entry in os.listdir(cache_folder) if len(entry) == 32]) == 2


def test_a_file_changed_just_now_is_not_cached(tmp_path, cache_folder):
    """Its timestamp could miss a change made within the same tick: nothing is kept until it is older."""
    root = write_coco(tmp_path / "data", when=time.time())
    assert cache.source_key(coco.coco_source_files(root), []) is None
    load_detection_dataset(root)
    assert not cache_folder.exists()


def test_the_warnings_of_a_build_are_given_by_every_load(tmp_path, cache_folder):
    root = write_coco(tmp_path / "data", boxes=((2, 3, 0, 8), (5, 5, 4, 4), (1, 1, 6, 6)))
    for _ in range(2):
        with pytest.warns(UserWarning, match=r"instances_train.json, annotations\[0\] \(id 0\): box .* has no area"):
            splits, _ = load_detection_dataset(root)
        assert splits["train"]["objects"][0]["bbox"] == []


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_VARIABLE, "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = write_coco(tmp_path / "data")
    calls = []
    read = coco._read_coco_file
    monkeypatch.setattr(coco, "_read_coco_file", lambda path: calls.append(path) or read(path))
    for _ in range(2):
        splits, _ = load_detection_dataset(root)
        assert not splits["train"].cache_files  # in memory
    assert len(calls) == 4 and not (tmp_path / "xdg").exists()


TWO_PROCESSES = """
import sys, time
from deformable_detr.data import sources
load, files = sources.CONVERTERS["coco"]

def counted(*args, **kwargs):
    with open(sys.argv[2], "a") as f:
        f.write("built\\n")
    time.sleep(2)  # the other process is waiting meanwhile
    return load(*args, **kwargs)

sources.CONVERTERS["coco"] = (counted, files)
splits, _ = sources.load_detection_dataset(sys.argv[1])
print(len(splits["train"]), splits["train"].cache_files[0]["filename"])
"""


def test_two_processes_loading_at_once_build_once(tmp_path, cache_folder):
    root, marker = write_coco(tmp_path / "data"), tmp_path / "builds.txt"
    env = dict(os.environ, **{cache.CACHE_VARIABLE: str(cache_folder)})
    command = [sys.executable, "-c", TWO_PROCESSES, root, str(marker)]
    started = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in started]
    assert [process.returncode for process in started] == [0, 0]
    assert marker.read_text() == "built\n"
    assert len(set(outputs)) == 1 and outputs[0].startswith("2 " + str(cache_folder))


def test_image_headers_are_kept_per_file(tmp_path, cache_folder, monkeypatch):
    root = write_coco(tmp_path / "data")
    records = [{"image": os.path.join(root, "train", f"{i}.jpg"), "objects": {"bbox": []}} for i in (0, 1)]
    read = []
    original = image_files.read_headers
    monkeypatch.setattr(image_files, "read_headers", lambda paths: read.append(list(paths)) or original(paths))
    for _ in range(2):
        checked = image_files.check_images(records, "here")
        assert [(r["width"], r["height"]) for r in checked] == [(32, 24), (32, 24)]
    assert read == [[r["image"] for r in records], []]
    Image.new("RGB", (20, 30)).save(records[1]["image"])  # another size
    os.utime(records[1]["image"], (OLD + 5, OLD + 5))
    checked = image_files.check_images(records, "here")
    assert read[-1] == [records[1]["image"]] and (checked[1]["width"], checked[1]["height"]) == (20, 30)


def test_what_the_checks_of_a_saved_dataset_left_out_is_kept(tmp_path, cache_folder, monkeypatch):
    """A save_to_disk dataset is Arrow already: the cache keeps which rows its checks left out."""
    root = write_coco(tmp_path / "data")
    splits, _ = load_detection_dataset(root)
    (tmp_path / "data" / "train" / "1.jpg").write_bytes(b"not an image")
    saved = tmp_path / "saved"
    DatasetDict(splits).save_to_disk(saved)  # (the images as paths)
    for top, folders, files in os.walk(saved):
        for name in files + folders:
            os.utime(os.path.join(top, name), (OLD, OLD))
    with pytest.warns(UserWarning, match="1 unreadable image"):
        first, _ = load_detection_dataset(str(saved), skip_bad_images=True)
    monkeypatch.setattr(sources, "_unreadable_rows", lambda *args: pytest.fail("checked again"))
    with pytest.warns(UserWarning, match="1 unreadable image"):
        again, _ = load_detection_dataset(str(saved), skip_bad_images=True)
    assert len(first["train"]) == len(again["train"]) == 1
    assert again["train"]["image_id"] == first["train"]["image_id"] == [0]
