"""The detect command: folders and globs in, a JSON and a drawn picture per image out, bad files skipped, inputs
never overwritten and every input its own outputs."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deformable_detr.apps.cli import detect_main as main
from deformable_detr.apps.detect import detect_files
from deformable_detr.utils.drawing import class_colour
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
    with pytest.warns(UserWarning, match=r"skipped .*broken\.jpg: cannot read it as an image"):
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
    # the command prints the summary; the library prints nothing
    assert capsys.readouterr().out == f"3 image(s) written to {tmp_path / 'out'}; 1 skipped\n"
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = detect_files([str(folder_of_images)], str(tmp_path / "model"), str(tmp_path / "again"))
    assert capsys.readouterr().out == "" and list(result["skipped"]) == [str(folder_of_images / "broken.jpg")]
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        result = json.loads((tmp_path / "out" / f"{name}.jpg.detections.json").read_text())
        assert (result["width"], result["height"]) == (640, 480)
        assert 0 < len(result["detections"]) <= 5
        for det in result["detections"]:
            assert det["label"] in ("RBC", "WBC", "Platelets") and det["score"] >= 0.01 and len(det["box"]) == 4
            x0, y0, x1, y1 = det["box"]  # clipped to the image (a random model's boxes cross its borders)
            assert 0 <= x0 <= x1 <= 640 and 0 <= y0 <= y1 <= 480
        assert Image.open(tmp_path / "out" / f"{name}.jpg.detections.jpg").size == (640, 480)
    assert not (tmp_path / "out" / "broken.jpg.detections.json").exists()


def test_globs_and_the_console_command(tmp_path, folder_of_images):
    saved_detector(tmp_path / "model")
    command = Path(sys.executable).parent / "deformable-detr-detect"  # installed beside this Python by pip
    result = run_command(
        [
            command,
            folder_of_images / "BloodImage_0000[01].jpg",
            folder_of_images / "broken.jpg",
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
    # a warning is one line: its kind and message, not the library's source line under it
    assert re.search(r"UserWarning: skipped .*broken\.jpg: cannot read it as an image", result.stderr)
    assert not re.search(r"\.py:\d+: UserWarning", result.stderr)  # no file:line, no source line under it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "BloodImage_00000.jpg.detections.json",
        "BloodImage_00000.jpg.detections.png",
        "BloodImage_00001.jpg.detections.json",
        "BloodImage_00001.jpg.detections.png",
        "detections.json",
    ]


def test_the_input_folder_as_output_dir_leaves_every_input_intact(tmp_path):
    saved_detector(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", images / "x.jpg")
    Image.open(BCCD / "JPEGImages" / "BloodImage_00001.jpg").save(images / "x.png")  # same stem, same format as out
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for _ in range(2):  # a second run leaves the first run's pictures out of the folder and replaces them
        result = detect_files([str(images)], str(tmp_path / "model"), str(images), threshold=0.01, image_format="png")
        assert result["written"] == [str(images / "x.jpg"), str(images / "x.png")]
        assert {p.name: p.read_bytes() for p in images.iterdir() if p.name in before} == before
        assert sorted(p.name for p in images.iterdir() if p.name not in before) == [
            "detections.json",
            "x.jpg.detections.json",
            "x.jpg.detections.png",
            "x.png.detections.json",
            "x.png.detections.png",
        ]


def test_an_output_that_would_be_an_input_is_refused_before_anything_is_written(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.jpg", "x.jpg.detections.png", "y.jpg", "y.jpg.detections.json"):  # named by hand as inputs
        shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", images / name)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for image, clash in (("x.jpg", "x.jpg.detections.png"), ("y.jpg", "y.jpg.detections.json")):
        paths = [str(images / image), str(images / clash)]
        with pytest.raises(ValueError, match=f"would overwrite the input {images / clash}"):
            detect_files(paths, str(tmp_path / "no-model"), str(images), image_format="png")
        with pytest.raises(SystemExit, match=f"^deformable-detr-detect: error: .*{clash}"):
            main([*paths, "--model", str(tmp_path / "no-model"), "--output_dir", str(images), "--image_format", "png"])
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_same_stems_in_different_folders_and_formats_get_one_output_each(tmp_path):
    saved_detector(tmp_path / "model")
    for folder in ("x", "y"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", tmp_path / "in" / folder / "img.jpg")
    Image.open(BCCD / "JPEGImages" / "BloodImage_00001.jpg").resize((320, 240)).save(tmp_path / "in/x/img.png")
    inputs = [str(tmp_path / "in" / name) for name in ("x/img.jpg", "x/img.png", "y/img.jpg")]
    result = detect_files(
        [str(tmp_path / "in/x"), str(tmp_path / "in/y")], str(tmp_path / "model"), str(tmp_path / "out")
    )
    assert result == {"written": inputs, "skipped": {}}
    on_disk = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert on_disk == sorted(
        ["detections.json"]
        + [f"{name}.detections.{ext}" for name in ("x/img.jpg", "x/img.png", "y/img.jpg") for ext in ("json", "jpg")]
    )
    for name, path in zip(("x/img.jpg", "x/img.png", "y/img.jpg"), inputs):
        assert json.loads((tmp_path / "out" / f"{name}.detections.json").read_text())["image"] == path
        size = (320, 240) if name.endswith("png") else (640, 480)
        assert Image.open(tmp_path / "out" / f"{name}.detections.jpg").size == size


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir/x.jpg"):
        detect_files([str(tmp_path / "no-such-dir/x.jpg")], str(tmp_path))
    with pytest.raises(SystemExit, match="^deformable-detr-detect: error: .*no-such-dir/x.jpg"):
        main([str(tmp_path / "no-such-dir/x.jpg"), "--model", str(tmp_path)])
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 2"):
        detect_files(["x.jpg"], str(tmp_path), threshold=2)
    with pytest.raises(SystemExit, match="threshold must be in"):
        main(["x.jpg", "--model", str(tmp_path), "--threshold", "2"])
    for device, message in (
        ("gpu", "device 'gpu' is not a torch device"),
        ("cuda:0", "device 'cuda:0': CUDA is not available here"),
        ("mps", "device 'mps': MPS is not available here"),  # also where torch is not built with mps
    ):
        if {"cuda:0": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(device):
            continue
        with pytest.raises(SystemExit, match=f"^deformable-detr-detect: error: {message}"):
            main(["x.jpg", "--model", str(tmp_path), "--device", device])
    # a folder with no images of its own (they are in a subfolder): named, not "0 image(s) written"
    (tmp_path / "photos" / "day").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "day" / "a.jpg")
    with pytest.raises(SystemExit, match=r"error: no images in the folder .*photos'.*photos/\*\*/\*\.jpg"):
        main([str(tmp_path / "photos"), "--model", str(tmp_path)])


def test_a_bad_processor_config_is_named(tmp_path):
    saved_detector(tmp_path / "model")
    config = tmp_path / "model" / "preprocessor_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"size": "big"}))
    with pytest.raises(SystemExit, match=r"error: .*model/preprocessor_config.json: size must be a dict"):
        main([str(BCCD / "JPEGImages" / "BloodImage_00000.jpg"), "--model", str(tmp_path / "model")])


def test_classes_get_distinct_colours():
    colours = [class_colour(i) for i in range(12)]
    assert len(set(colours)) == 12


def test_non_finite_outputs_warn_once_naming_the_images(tmp_path, folder_of_images, monkeypatch):
    """Weights (or pixels) that make the outputs NaN give no detections: detect and evaluate say so once, naming
    the images, so an empty result is not taken for a success."""
    from deformable_detr import DeformableDetrImageProcessor
    from deformable_detr.apps import detect as detect_module
    from deformable_detr.apps import evaluate as evaluate_module
    from deformable_detr.apps.evaluate import evaluate_saved_model
    from tests.support.models import tiny_model

    model = tiny_model(num_labels=3, id2label={0: "Platelets", 1: "RBC", 2: "WBC"})  # BCCD's classes, sorted
    model.save_pretrained(tmp_path / "model")
    DeformableDetrImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(tmp_path / "model")
    load = detect_module.load_detector

    def poisoned(path, device):  # what the load-time check would refuse: poisoned after it
        model, processor = load(path, device)
        model.model.input_proj[0][0].bias.data[0] = float("nan")
        return model, processor

    monkeypatch.setattr(detect_module, "load_detector", poisoned)
    monkeypatch.setattr(evaluate_module, "load_detector", poisoned)
    with pytest.warns(RuntimeWarning, match=r"outputs for 3 image\(s\) are not finite .*BloodImage_0000"):
        detect_files([str(folder_of_images)], str(tmp_path / "model"), str(tmp_path / "out"))
    with pytest.warns(RuntimeWarning, match=r"outputs for 2 image\(s\) are not finite .*BloodImage_00"):
        evaluate_saved_model(str(tmp_path / "model"), str(BCCD), "test")


def test_a_decompression_bomb_is_named_and_skipped(tmp_path, monkeypatch):
    """Above PIL's limit (2 x MAX_IMAGE_PIXELS) an image is skipped by name and the rest of its batch written;
    above MAX_IMAGE_PIXELS PIL's warning is given again naming the file."""
    saved_detector(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for name, size in (("bomb.png", (640, 480)), ("large.png", (400, 300)), ("small.png", (200, 150))):
        Image.new("RGB", size, (200, 100, 100)).save(images / name)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # bomb 307,200 > 2x; large 120,000 > 1x
    with pytest.warns(Warning) as caught:
        result = detect_files([str(images)], str(tmp_path / "model"), str(tmp_path / "out"))
    assert result["written"] == [str(images / "large.png"), str(images / "small.png")]
    assert list(result["skipped"]) == [str(images / "bomb.png")]
    messages = [str(w.message) for w in caught]
    assert any(re.match(r"skipped .*bomb\.png: cannot read it as an image .*decompression bomb", m) for m in messages)
    assert any(re.match(r".*large\.png: Image size \(120000 pixels\) exceeds limit", m) for m in messages)


def test_a_corrupt_processor_config_is_an_error_and_a_missing_one_a_warning(tmp_path):
    """A preprocessor_config.json that is not JSON is an error naming it, before anything is written (the default
    processor would give other sizes and other detections); a missing one is a warning, and the default is used."""
    saved_detector(tmp_path / "model")
    image = str(BCCD / "JPEGImages" / "BloodImage_00000.jpg")
    config = tmp_path / "model" / "preprocessor_config.json"
    config.write_text("{bad")
    with pytest.raises(SystemExit, match=r"^deformable-detr-detect: error: .*model/preprocessor_config.json: "):
        main([image, "--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    config.unlink()
    with pytest.warns(UserWarning, match=r"model has no preprocessor_config.json: using the default image processor"):
        detect_files([image], str(tmp_path / "model"), str(tmp_path / "out"))


def test_nothing_to_detect_is_an_error_and_a_matched_folder_is_searched(tmp_path, folder_of_images, capsys):
    """Nothing to detect is an error, not "0 image(s) written": a glob matching only this command's outputs, and
    files none of which is an image. A folder that a glob matches is searched for images."""
    saved_detector(tmp_path / "model")
    model = ["--model", str(tmp_path / "model")]
    image = folder_of_images / "BloodImage_00000.jpg"
    main([str(image), *model, "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"error: no images match .*out/\*\.jpg.*this command's outputs"):
        main([str(tmp_path / "out" / "*.jpg"), *model])
    (tmp_path / "notes.md").write_text("# not an image")
    with pytest.warns(UserWarning, match="skipped .*notes.md"):
        with pytest.raises(SystemExit, match=r"^deformable-detr-detect: error: none of the 1 image\(s\) could be read"):
            main([str(tmp_path / "notes.md"), *model, "--output_dir", str(tmp_path / "out2")])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="broken.jpg"):
        main([str(tmp_path / "imag*"), *model, "--output_dir", str(tmp_path / "out3")])
    assert capsys.readouterr().out == f"3 image(s) written to {tmp_path / 'out3'}; 1 skipped\n"


def test_ctrl_c_keeps_whole_outputs_only_and_exits_130(tmp_path, folder_of_images, monkeypatch, capsys):
    """Ctrl-C while a picture is being written leaves only the whole outputs of the images before it (no truncated
    picture, no JSON without its picture) and ends in one line and exit status 130, not a traceback."""
    from deformable_detr.apps import detect as detect_module

    saved_detector(tmp_path / "model")
    draw = detect_module.draw_detections

    class Interrupted:
        def save(self, path, **kwargs):  # a part written, then Ctrl-C
            Path(path).write_bytes(b"\xff\xd8 part of a JPEG")
            raise KeyboardInterrupt

    monkeypatch.setattr(detect_module, "draw_detections", lambda image, found: draws.pop(0)(image, found))
    draws = [draw, lambda image, found: Interrupted()]
    with pytest.warns(UserWarning, match="broken.jpg"), pytest.raises(SystemExit) as stopped:
        try:
            main([str(folder_of_images), "--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out")])
        except KeyboardInterrupt:  # not raised on: it would stop the test session
            pytest.fail("Ctrl-C came out of the command as a KeyboardInterrupt traceback")
    assert stopped.value.code == 130
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert last_line == f"deformable-detr-detect: interrupted; 1 image(s) written to {tmp_path / 'out'}"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "BloodImage_00000.jpg.detections.jpg",
        "BloodImage_00000.jpg.detections.json",
    ]


def test_help_texts_and_spellings_of_options(tmp_path, capsys):
    """--help shows no developer docstring (function and file names); --model X.ONNX is taken for an ONNX file;
    --output_dir "" is refused before the model is loaded."""
    from deformable_detr.apps.cli import evaluate_main, export_main

    for command in (main, evaluate_main, export_main):
        with pytest.raises(SystemExit):
            command(["--help"])
        text = capsys.readouterr().out
        assert not re.search(r"`|\w+\.py\b|\w+_\w+\(|\(opset OPSET", text), text
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "pip install 'hub-deformable-detr[onnx]'" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit, match=r"error: model .*absent\.ONNX: no such file"):
        main([str(BCCD / "JPEGImages"), "--model", str(tmp_path / "absent.ONNX")])
    with pytest.raises(SystemExit, match=r"error: output_dir \(--output_dir\) is empty"):
        main([str(BCCD / "JPEGImages"), "--model", str(tmp_path / "no-model"), "--output_dir", ""])


def test_classes_filter_and_one_combined_coco_results_file(tmp_path, folder_of_images):
    """--classes keeps the detections of the named classes (an unknown name is an error listing the model's), and
    output_dir/detections.json holds every image's detections in COCO's results format."""
    saved_detector(tmp_path / "model")
    arguments = [str(folder_of_images / "BloodImage_0000[01].jpg"), "--model", str(tmp_path / "model")]
    with pytest.raises(SystemExit, match=r"error: classes \['Cat'\]: the model's classes are \['RBC', 'WBC', 'Pla"):
        main([*arguments, "--classes", "RBC,Cat"])
    main([*arguments, "--output_dir", str(tmp_path / "all"), "--threshold", "0.01"])
    main([*arguments, "--output_dir", str(tmp_path / "out"), "--threshold", "0.01", "--classes", "WBC, Platelets"])
    combined = json.loads((tmp_path / "out" / "detections.json").read_text())
    everything = json.loads((tmp_path / "all" / "detections.json").read_text())
    assert combined["categories"] == [
        {"id": 0, "name": "RBC"},
        {"id": 1, "name": "WBC"},
        {"id": 2, "name": "Platelets"},
    ]
    assert combined["images"] == [
        {"id": i + 1, "file_name": str(folder_of_images / f"BloodImage_0000{i}.jpg"), "width": 640, "height": 480}
        for i in range(2)
    ]
    assert combined["annotations"] == [a for a in everything["annotations"] if a["category_id"] in (1, 2)]
    assert {a["category_id"] for a in everything["annotations"]} - {1, 2}  # the filter left something out
    per_image = json.loads((tmp_path / "out" / "BloodImage_00000.jpg.detections.json").read_text())["detections"]
    assert {d["label"] for d in per_image} <= {"WBC", "Platelets"}
    first = [a for a in combined["annotations"] if a["image_id"] == 1]
    assert [(a["category_id"], a["score"]) for a in first] == [(d["label_id"], d["score"]) for d in per_image]
    for a, d in zip(first, per_image):  # x, y, width, height of the x0, y0, x1, y1 box
        x0, y0, x1, y1 = d["box"]
        assert a["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)


def test_a_video_gives_its_frames_detections_and_a_drawn_video(tmp_path):
    av = pytest.importorskip("av", reason="the [video] extra is not installed")
    saved_detector(tmp_path / "model")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as target:
        stream = target.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(4):
            picture = Image.new("RGB", (64, 64), (40 * i, 120, 200))
            for packet in stream.encode(av.VideoFrame.from_image(picture)):
                target.mux(packet)
        for packet in stream.encode():
            target.mux(packet)
    main([str(video), "--model", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), "--threshold", "0"])
    record = json.loads((tmp_path / "out" / "clip.mp4.detections.json").read_text())
    assert (record["width"], record["height"], record["fps"]) == (64, 64, 5.0)
    assert [f["frame"] for f in record["frames"]] == [0, 1, 2, 3] and all(f["detections"] for f in record["frames"])
    with av.open(str(tmp_path / "out" / "clip.mp4.detections.mp4")) as drawn:
        frames = [frame.to_image() for frame in drawn.decode(video=0)]
    assert len(frames) == 4 and frames[0].size == (64, 64)
    combined = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [(i["frame"], i["file_name"]) for i in combined["images"]] == [(n, str(video)) for n in range(4)]


def test_a_video_without_the_video_extra_is_an_error_naming_it(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails
    with pytest.raises(SystemExit, match=r"clip\.mp4 is a video: reading videos needs PyAV, the \[video\] extra"):
        main([str(tmp_path / "clip.mp4"), "--model", str(tmp_path / "no-model")])


def test_an_image_too_thin_to_resize_is_skipped_by_name(tmp_path):
    """10000x20 resizes to a short side of 0 pixels at the saved processor's edges (128, 200): that image is named
    and skipped, and the others are written."""
    saved_detector(tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (10000, 20)).save(tmp_path / "in" / "thin.png")
    Image.new("RGB", (64, 48), "white").save(tmp_path / "in" / "fine.png")
    with pytest.warns(UserWarning, match=r"skipped .*thin\.png: too thin to resize \(10000x20: its short side is 0"):
        result = detect_files([str(tmp_path / "in")], str(tmp_path / "model"), str(tmp_path / "out"))
    assert [Path(p).name for p in result["written"]] == ["fine.png"]
    assert [Path(p).name for p in result["skipped"]] == ["thin.png"]
