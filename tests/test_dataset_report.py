import os
from collections import Counter

from PIL import Image

from deformable_detr.apps.cli import data_main
from deformable_detr.apps.dataset_report import check_dataset, show_dataset
from deformable_detr.data.shapes import CLASS_NAMES, shapes_dataset
from tests.support.bccd import BCCD
from tests.support.datasets_on_disk import write_coco

BCCD_COUNTS = {  # the vendored subset's VOC files, by ImageSets/Main (two boxes without area are left out)
    "train": {"images": 8, "Platelets": 11, "RBC": 118, "WBC": 8},
    "validation": {"images": 3, "Platelets": 0, "RBC": 46, "WBC": 3},
    "test": {"images": 2, "Platelets": 1, "RBC": 34, "WBC": 2},
}


def test_check_counts_the_vendored_bccd_per_split_and_class_and_lists_its_problems(capsys):
    report = check_dataset(str(BCCD))
    assert report["format"] == "voc" and report["classes"] == ["Platelets", "RBC", "WBC"]
    assert list(report["splits"]) == ["train", "validation", "test"]
    for split, expected in BCCD_COUNTS.items():
        counts = report["splits"][split]
        assert {"images": counts["images"]} | counts["per_class"] == expected
        assert counts["objects"] == sum(counts["per_class"].values()) and counts["crowd"] == 0
    assert report["box_sizes"]["counts"] == [0, 0, 0, 13, 66, 128, 16, 0, 0]  # 223 objects, 32 to 256 pixels
    assert sorted(p.split("Annotations/")[1] for p in report["problems"]) == [
        "BloodImage_00338.xml: box [504.0, 337.0, 0.0, 0.0] has no area; it is left out",
        "BloodImage_00343.xml: box [181.0, 329.0, 0.0, 0.0] has no area; it is left out",
    ]
    data_main(["check", str(BCCD)])
    printed = capsys.readouterr().out
    assert "RBC                              118          46          34" in printed
    assert "    96-128     128 ########################################" in printed
    assert "2 problem(s):" in printed and "BloodImage_00338.xml: box" in printed


def test_check_counts_a_coco_folder_and_lists_a_missing_image_without_refusing_it(tmp_path):
    splits = {"train": shapes_dataset(6, 64, seed=1), "valid": shapes_dataset(4, 64, seed=2)}
    root = write_coco(splits, CLASS_NAMES, str(tmp_path / "coco"))
    os.remove(tmp_path / "coco" / "valid" / "valid_003.jpg")
    report = check_dataset(root)
    assert report["format"] == "coco" and report["classes"] == CLASS_NAMES
    for name, split, kept in (("train", splits["train"], 6), ("validation", splits["valid"], 3)):
        expected = Counter(CLASS_NAMES[c] for row in split.select(range(kept)) for c in row["objects"]["category"])
        counts = report["splits"][name]
        assert counts["images"] == kept
        assert counts["per_class"] == {n: expected[n] for n in CLASS_NAMES}
    assert len(report["problems"]) == 1 and "valid_003.jpg" in report["problems"][0]


def test_show_draws_the_boxes_of_the_first_images_of_each_split(tmp_path, capsys):
    written = show_dataset(str(BCCD), str(tmp_path / "boxes"), images_per_split=2)
    names = {split: sorted(os.listdir(tmp_path / "boxes" / split)) for split in BCCD_COUNTS}
    assert names == {
        "train": ["0_BloodImage_00001.jpg", "1_BloodImage_00003.jpg"],
        "validation": ["0_BloodImage_00000.jpg", "1_BloodImage_00002.jpg"],
        "test": ["0_BloodImage_00007.jpg", "1_BloodImage_00011.jpg"],
    }
    assert len(written) == 6
    drawn = Image.open(tmp_path / "boxes" / "train" / "0_BloodImage_00001.jpg")
    with Image.open(BCCD / "JPEGImages" / "BloodImage_00001.jpg") as original:
        assert drawn.size == original.size
        difference = sum(abs(a - b) for a, b in zip(drawn.convert("L").getdata(), original.convert("L").getdata()))
        assert difference > 100 * drawn.width  # boxes and names drawn, not the image as it was
    data_main(["show", str(BCCD), "--output_dir", str(tmp_path / "more"), "--images_per_split", "5"])
    assert capsys.readouterr().out.strip() == f"10 picture(s) written to {tmp_path / 'more'}"  # 5 + 3 + 2


def test_bad_arguments_fail_in_one_line(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="^deformable-detr-data: error: images_per_split must be at least 1, got 0"):
        data_main(["show", str(BCCD), "--output_dir", str(tmp_path), "--images_per_split", "0"])
    with pytest.raises(SystemExit, match="^deformable-detr-data: error: .*no_such_dataset"):
        data_main(["check", str(tmp_path / "no_such_dataset")])
