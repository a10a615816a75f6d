"""The detect command: folders and globs in, a JSON and a drawn picture per image out, bad files skipped."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from deformable_detr.cli import detect_main as main
from deformable_detr.detect import class_colour, detect_files
from tests.support.bccd import BCCD
from tests.support.models import saved_detector
from tests.support.processes import run_command


@pytest.fixture
def folder_of_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        shutil.copy(BCCD / "JPEGImages" / f"{name}.jpg", images / f"{name}.jpg")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    return images


def test_a_folder_gives_json_and_pictures_and_skips_the_broken_file(tmp_path, folder_of_images, capsys):
    saved_detector(tmp_path / "model")
    main(
        [
            str(folder_of_images),
            "--model",
            str(tmp_path / "model"),
            "--output_dir",
            str(tmp_path / "out"),
            "--threshold",
            "0.01",
            "--batch_size",
            "2",
            "--top_k",
            "5",
        ]
    )
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.jpg" in err
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        result = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert (result["width"], result["height"]) == (640, 480)
        assert 0 < len(result["detections"]) <= 5
        for det in result["detections"]:
            assert det["label"] in ("RBC", "WBC", "Platelets") and det["score"] >= 0.01 and len(det["box"]) == 4
        assert Image.open(tmp_path / "out" / f"{name}.jpg").size == (640, 480)
    assert not (tmp_path / "out" / "broken.json").exists()


def test_globs_and_the_console_command(tmp_path, folder_of_images):
    saved_detector(tmp_path / "model")
    command = Path(sys.executable).parent / "deformable-detr-detect"  # installed beside this Python by pip
    run_command(
        [
            command,
            folder_of_images / "BloodImage_0000[01].jpg",
            "--model",
            tmp_path / "model",
            "--output_dir",
            tmp_path / "out",
            "--image_format",
            "png",
            "--threshold",
            "0.01",
        ],
        timeout=300,
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "BloodImage_00000.json",
        "BloodImage_00000.png",
        "BloodImage_00001.json",
        "BloodImage_00001.png",
    ]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir/x.jpg"):
        detect_files([str(tmp_path / "no-such-dir/x.jpg")], str(tmp_path))
    with pytest.raises(SystemExit, match="^deformable-detr-detect: error: .*no-such-dir/x.jpg"):
        main([str(tmp_path / "no-such-dir/x.jpg"), "--model", str(tmp_path)])
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        detect_files(["x.jpg"], str(tmp_path), threshold=2)
    with pytest.raises(SystemExit, match="threshold must be in"):
        main(["x.jpg", "--model", str(tmp_path), "--threshold", "2"])


def test_classes_get_distinct_colours():
    colours = [class_colour(i) for i in range(12)]
    assert len(set(colours)) == 12
