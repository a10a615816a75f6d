"""ONNX export (onnx_export.py) and running the file (onnx_detector.py): every variant exports with dynamic sizes
and matches PyTorch in onnxruntime (and OpenVINO where installed), detect gives the same detections from the file,
the metadata round-trips, and what cannot be exported or run says why."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

from deformable_detr import DeformableDetrImageProcessor  # noqa: E402
from deformable_detr.apps.cli import export_main  # noqa: E402
from deformable_detr.apps.detect import detect_files  # noqa: E402
from deformable_detr.apps.onnx_detector import OnnxDetector  # noqa: E402
from deformable_detr.apps.onnx_export import TOLERANCE, _example_inputs, export_onnx  # noqa: E402
from tests.support.bccd import BCCD  # noqa: E402
from tests.support.models import saved_detector, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model folder, .onnx file) of the tiny four-level detector with BCCD's labels, exported by the command."""
    folder = tmp_path_factory.mktemp("onnx")
    saved_detector(folder / "model")
    export_main(["--model", str(folder / "model"), "--output", str(folder / "model.onnx")])
    return folder / "model", folder / "model.onnx"


@pytest.mark.parametrize(
    "variant",
    [
        dict(num_feature_levels=1),  # single-scale
        dict(with_box_refine=True),
        dict(with_box_refine=True, two_stage=True),
    ],
    ids=["single-scale", "box-refine", "two-stage"],
)
def test_every_variant_exports_and_matches_pytorch(tmp_path, variant):
    """The export's own check (an image of a size it was not traced at, a padded batch of two) within 1e-4."""
    tiny_model(**variant).save_pretrained(tmp_path / "model")
    report = export_onnx(str(tmp_path / "model"), str(tmp_path / "model.onnx"))
    assert len(report["max_abs_difference"]) == 2
    assert all(difference <= TOLERANCE for difference in report["max_abs_difference"].values()), report


def test_the_export_writes_metadata(exported):
    model_folder, path = exported
    detector = OnnxDetector(str(path))
    assert detector.config.id2label == {0: "RBC", 1: "WBC", 2: "Platelets"}
    saved = DeformableDetrImageProcessor.from_pretrained(model_folder).to_dict()
    assert detector.image_processor().to_dict() == saved
    assert detector.metadata["deformable_detr_version"]


def test_sizes_batches_and_padding_match_pytorch(exported):
    """Three sizes (none the traced one) and a padded batch: logits and boxes within 1e-4 of PyTorch."""
    from deformable_detr.weights.loading import load_model

    model_folder, path = exported
    model, detector = load_model(str(model_folder)).eval(), OnnxDetector(str(path))
    # (40, 300): thinner than the coarsest stride, padded by both (unpadded, its logits would be 0.24 off)
    for batch, size, padded in [
        (1, (128, 128), False),
        (3, (200, 328), True),
        (1, (480, 256), False),
        (1, (40, 300), False),
    ]:
        pixel_values, pixel_mask = _example_inputs(batch, size, padded, seed=batch)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        got = detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
        assert torch.allclose(got.logits, expected.logits, atol=TOLERANCE, rtol=0), (batch, size)
        assert torch.allclose(got.pred_boxes, expected.pred_boxes, atol=TOLERANCE, rtol=0), (batch, size)


def test_detect_from_the_file_equals_detect_from_pytorch(exported, tmp_path):
    model_folder, path = exported
    images = tmp_path / "images"
    images.mkdir()
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        shutil.copy(BCCD / "JPEGImages" / f"{name}.jpg", images / f"{name}.jpg")
    for model, out in ((model_folder, "torch"), (path, "onnx")):
        detect_files([str(images)], str(model), str(tmp_path / out), threshold=0.01, batch_size=2)
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002"):
        torch_result, onnx_result = (
            json.load(open(tmp_path / out / f"{name}.jpg.detections.json"))["detections"] for out in ("torch", "onnx")
        )
        assert len(torch_result) == len(onnx_result) > 0
        for a, b in zip(torch_result, onnx_result):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) <= 1e-4
            assert np.allclose(a["box"], b["box"], atol=0.05)  # pixels (of 640x480), rounded to 0.01


def test_the_file_runs_in_openvino(exported):
    openvino = pytest.importorskip("openvino", reason="OpenVINO is not installed")
    from deformable_detr.weights.loading import load_model

    model_folder, path = exported
    # f32: on CPUs with native bf16, OpenVINO otherwise computes in bf16 by default
    compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    pixel_values, pixel_mask = _example_inputs(2, (160, 224), padded=True, seed=7)
    results = compiled({"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
    with torch.no_grad():
        expected = load_model(str(model_folder)).eval()(pixel_values=pixel_values, pixel_mask=pixel_mask)
    logits, boxes = (torch.from_numpy(results[compiled.output(name)]) for name in ("logits", "pred_boxes"))
    assert torch.allclose(logits, expected.logits, atol=TOLERANCE, rtol=0)
    assert torch.allclose(boxes, expected.pred_boxes, atol=TOLERANCE, rtol=0)


def test_what_cannot_be_exported_or_run_says_why(tmp_path, exported, monkeypatch):
    from deformable_detr.apps import onnx_export

    with pytest.raises(FileNotFoundError, match="missing: no such folder"):
        export_onnx(str(tmp_path / "missing"), str(tmp_path / "x.onnx"))
    with pytest.raises(ValueError, match="must end in .onnx"):
        export_onnx(str(exported[0]), str(tmp_path / "x.bin"))
    with pytest.raises(ValueError, match="opset 13: GridSample, which the attention needs, came in opset 16"):
        export_onnx(str(exported[0]), str(tmp_path / "x.onnx"), opset=13)
    # an output path that cannot be written fails before the export, not after its minutes of work
    monkeypatch.setattr("deformable_detr.apps.detect.load_detector", lambda *a: pytest.fail("the model was loaded"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileExistsError):
        export_onnx(str(exported[0]), str(tmp_path / "a_file" / "x.onnx"))
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ValueError, match="output .*folder.onnx' is a folder"):
        export_onnx(str(exported[0]), str(tmp_path / "folder.onnx"))
    monkeypatch.undo()
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="text.onnx: not an ONNX model onnxruntime can load"):
        OnnxDetector(str(tmp_path / "text.onnx"))
    with pytest.raises(SystemExit, match="^deformable-detr-detect: error: model .*absent.onnx: no such file"):
        from deformable_detr.apps.cli import detect_main

        detect_main([str(BCCD / "JPEGImages"), "--model", str(tmp_path / "absent.onnx")])

    # an .onnx file as the model to export is refused: it is an export already, with no PyTorch model in it
    for format in ("onnx", "transformers"):
        with pytest.raises(SystemExit, match=r"error: model '.*model\.onnx' is an \.onnx file, an export already"):
            export_main(["--model", str(exported[1]), "--format", format, "--output", str(tmp_path / "again.onnx")])

    def refuses(*args, **kwargs):
        raise RuntimeError("Failed to export the model with torch.export.\\nunsupported op\\n(details)")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", refuses)
    with pytest.raises(ValueError, match="cannot be exported to ONNX \\(RuntimeError: Failed to export"):
        export_onnx(str(exported[0]), str(tmp_path / "x.onnx"))


def test_evaluate_from_the_file_equals_evaluate_from_pytorch(tmp_path):
    """The evaluate command takes the .onnx file too: the same metrics as the PyTorch model on BCCD's test split."""
    from deformable_detr.apps.evaluate import evaluate_saved_model

    model = tiny_model(id2label={0: "Platelets", 1: "RBC", 2: "WBC"})  # BCCD's classes, as the VOC loader sorts them
    model.save_pretrained(tmp_path / "model")
    DeformableDetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 200}).save_pretrained(tmp_path / "model")
    export_onnx(str(tmp_path / "model"), str(tmp_path / "model.onnx"), check=False)
    from_torch, from_onnx = (
        evaluate_saved_model(str(path), str(BCCD), "test") for path in (tmp_path / "model", tmp_path / "model.onnx")
    )
    for name in ("map", "map_50", "mar_100"):
        assert from_onnx[name] == pytest.approx(from_torch[name], abs=1e-4), name


def test_a_bad_output_or_opset_fails_before_the_export_and_a_failed_check_leaves_no_file(
    tmp_path, exported, monkeypatch
):
    """An output folder that cannot be written in and an opset above what torch writes are refused before the model
    is loaded (the export takes minutes on a full model); a file that fails the check is not left at the output."""
    from deformable_detr.apps import onnx_export

    with monkeypatch.context() as patched:
        patched.setattr("deformable_detr.apps.detect.load_detector", lambda *a: pytest.fail("the model was loaded"))
        with pytest.raises(ValueError, match=r"^opset 99: torch .*'s ONNX exporter writes opsets up to \d+"):
            export_onnx(str(exported[0]), str(tmp_path / "x.onnx"), opset=99)
        with pytest.raises(SystemExit, match="error: opset 99: "):
            export_main(["--model", str(exported[0]), "--output", str(tmp_path / "x.onnx"), "--opset", "99"])
        if os.path.isdir("/proc"):  # a folder that even root cannot write in
            with pytest.raises(OSError, match="^/proc/x.onnx cannot be written"):
                export_onnx(str(exported[0]), "/proc/x.onnx")
    monkeypatch.setattr(onnx_export, "TOLERANCE", -1.0)  # every difference fails
    with pytest.raises(onnx_export.ExportCheckError, match=r"x\.ONNX not written: the exported file differs"):
        export_onnx(str(exported[0]), str(tmp_path / "x.ONNX"))  # the suffix in any case
    assert list(tmp_path.iterdir()) == []


def test_the_export_prints_none_of_the_exporters_warnings_and_keeps_others(tmp_path, capfd, caplog):
    """The exporter's lines that every export of ours would print (four "torchvision is not installed. Skipping
    torchvision::..." log lines, a FutureWarning (LeafSpec), three UserWarnings ("The axis name: batch will not be
    used")) are filtered inside the export only: others of its logger, and other warnings, are kept."""
    import logging
    import warnings

    from deformable_detr.apps.onnx_export import EXPORTER_LOG

    tiny_model(num_feature_levels=1).save_pretrained(tmp_path / "model")
    DeformableDetrImageProcessor().save_pretrained(tmp_path / "model")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        export_onnx(str(tmp_path / "model"), str(tmp_path / "model.onnx"), check=False)
        logging.getLogger(EXPORTER_LOG[0]).warning("another line of the exporter's")  # kept
        warnings.warn("another warning", UserWarning, stacklevel=1)  # kept
    assert [str(w.message) for w in caught] == ["another warning"]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged == ["another line of the exporter's"]
    assert capfd.readouterr().err == ""
