"""ONNX export: a saved Deformable DETR (ours or transformers', a folder or a Hub id) as one ONNX file of standard
operators (opset OPSET by default: onnxruntime, OpenVINO and TensorRT all run it) with a dynamic batch, height and
width, checked in onnxruntime against PyTorch (`export_onnx`; the `deformable-detr-export` command in cli.py).
onnx_detector.py runs the file.

Multi-scale deformable attention is exported as its grid_sample formulation (one GridSample per level): under
torch.export the op takes its standard-op form by itself (`multi_scale_deformable_attention`), so the fused
kernels stay on in eager mode and nothing needs to be set (measured in onnxruntime on the full-size model, the
alternative, row gathers of the four corners, ran 1.4x slower and took 4x as long to export). torch's exporter
(torch.export + onnxscript) records the graph; its optimiser stays off: measured, it made the export 30% slower
and the file no faster in onnxruntime, which (as OpenVINO and TensorRT) optimises the graph when loading it.
"""

import json
import logging
import os
import time
import warnings
from contextlib import contextmanager

import torch

from ..utils.file_writing import check_writable, replaced_when_done
from .onnx_detector import INPUTS, OUTPUTS, OnnxDetector

OPSET = 18  # GridSample (16+) in every runtime we target; onnxruntime >= 1.14, OpenVINO >= 2023, TensorRT >= 8.6
MIN_OPSET = 16  # GridSample
TOLERANCE = 1e-4  # max abs difference of logits and boxes, fp32, onnxruntime vs PyTorch
MAX_SIDE = 4096
# What torch's exporter says on every export of ours that is no news to the user: the warnings it raises (a torch
# deprecation inside torch.export; our Dims shared by pixel_values and pixel_mask, which is the intent) and the log
# lines of its registry (torchvision's ops, which our graph does not use, are skipped when torchvision is absent).
EXPORTER_WARNINGS = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    (UserWarning, r"# The axis name: \w+ will not be used, since it shares the same shape constraints"),
)
EXPORTER_LOG = ("torch.onnx._internal.exporter._registration", "torchvision is not installed. Skipping torchvision::")


class ExportCheckError(ValueError):
    """The exported file does not reproduce the PyTorch model."""


class _Outputs(torch.nn.Module):
    """The detector as the file's graph: (pixel_values, pixel_mask) -> (logits, pred_boxes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask):
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


class _Dropped(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextmanager
def exporter_quiet():
    """EXPORTER_WARNINGS and EXPORTER_LOG's lines left out inside; every other warning and log line kept."""
    logger, dropped = logging.getLogger(EXPORTER_LOG[0]), _Dropped(EXPORTER_LOG[1])
    logger.addFilter(dropped)
    try:
        with warnings.catch_warnings():
            for category, message in EXPORTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        logger.removeFilter(dropped)


def refuse_an_export(model_path: str):
    """ValueError for an .onnx file as the model to export: it is an export already, and holds no PyTorch model."""
    from .detect import is_onnx

    if is_onnx(model_path):
        raise ValueError(
            f"model {model_path!r} is an .onnx file, an export already: give the saved model (a folder or Hub id) "
            "it was exported from"
        )


def export_onnx(model_path: str, output: str, check: bool = True, opset: int = OPSET) -> dict:
    """Writes `model_path`'s detector to `output` (.onnx) and, with `check`, compares it with PyTorch in
    onnxruntime; -> {"seconds": export time, "max_abs_difference": {case: figure}}. The file is written beside
    `output` and renamed to it once checked, so a failed export or check leaves nothing there. Raises
    ExportCheckError (a ValueError) when a difference exceeds TOLERANCE, ValueError for a model that cannot be
    exported or an opset outside MIN_OPSET..max_opset(), OSError naming `output` if it cannot be written (before
    the export)."""
    from importlib.metadata import version

    from .detect import load_detector

    _check_export_arguments(model_path, output, opset)
    model, processor = load_detector(model_path, "cpu")
    smallest = 2 * (model.model.min_image_size or 32)  # the coarsest map at least 2x2: a real, not a special, size
    started = time.time()
    program = _exported_program(model, model_path, opset, smallest)
    metadata = {
        "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        "image_processor": json.dumps(processor.to_dict()),
        "deformable_detr_version": version("hub-deformable-detr"),
        "min_image_size": str(model.model.min_image_size or 0),  # OnnxDetector pads a thinner canvas, as the model
    }
    program.model.metadata_props.update(metadata)
    with replaced_when_done(output) as temporary:  # a file that fails the check is not left at `output`
        program.save(temporary, external_data=False)
        report = {"seconds": round(time.time() - started, 1), "max_abs_difference": {}}
        if check:
            try:
                report["max_abs_difference"] = check_export(model, temporary, smallest)
            except ValueError as error:
                raise type(error)(f"{output} not written: {error}") from error
    return report


def _check_export_arguments(model_path: str, output: str, opset: int):
    """ValueError for a model that is an export already, an output that is no .onnx file, or an opset outside
    MIN_OPSET..max_opset(); OSError naming `output` if it cannot be written (checked before the export)."""
    refuse_an_export(model_path)
    if not output.lower().endswith(".onnx"):
        raise ValueError(f"output {output!r} must end in .onnx")
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset}: GridSample, which the attention needs, came in opset {MIN_OPSET}")
    if opset > max_opset():
        raise ValueError(f"opset {opset}: torch {torch.__version__}'s ONNX exporter writes opsets up to {max_opset()}")
    if os.path.isdir(output):
        raise ValueError(f"output {output!r} is a folder")
    check_writable(output)


def _exported_program(model, model_path: str, opset: int, smallest: int):
    """torch's ONNX program of `model`, for any batch of up to 64 images with sides from `smallest` to MAX_SIDE;
    ValueError naming `model_path` where the exporter fails."""
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=smallest, max=MAX_SIDE)
    width = torch.export.Dim("width", min=smallest, max=MAX_SIDE)
    example = _example_inputs(2, (smallest + 32, smallest + 64), padded=False)  # batch 2: no batch-1 special case
    try:
        with exporter_quiet():
            program = torch.onnx.export(
                _Outputs(model).eval(),
                example,
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes={
                    "pixel_values": {0: batch, 2: height, 3: width},
                    "pixel_mask": {0: batch, 1: height, 2: width},
                },
                optimize=False,
                verbose=False,
            )
    except Exception as error:  # the exporter's many exception types
        raise ValueError(
            f"{model_path}: the model cannot be exported to ONNX ({type(error).__name__}: {error})"
        ) from error
    return program


def max_opset() -> int:
    """The newest opset torch's ONNX exporter writes (torch.onnx._constants, which torch keeps private; where it is
    gone, the newest the installed onnx package knows)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET

        return ONNX_MAX_OPSET
    except ImportError:
        import onnx

        return onnx.defs.onnx_opset_version()


def _example_inputs(batch: int, size: tuple[int, int], padded: bool, seed: int = 0):
    """(pixel_values (batch, 3, h, w), pixel_mask (batch, h, w) int64); with `padded`, the last image covers only
    the top-left 3/4 of each side."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch, 3, *size, generator=generator)
    pixel_mask = torch.ones(batch, *size, dtype=torch.int64)
    if padded:
        pixel_mask[-1, size[0] * 3 // 4 :] = 0
        pixel_mask[-1, :, size[1] * 3 // 4 :] = 0
    return pixel_values, pixel_mask


def max_abs_difference(got, expected) -> float:
    """The largest absolute difference of logits and boxes between two models' outputs."""
    return max(
        float((got.logits - expected.logits).abs().max()), float((got.pred_boxes - expected.pred_boxes).abs().max())
    )


def check_export(model, path: str, smallest: int) -> dict:
    """Max abs differences of logits and boxes, onnxruntime vs PyTorch (fp32), on one image of a size the export
    was not traced at and on a padded batch of two; raises ExportCheckError above TOLERANCE."""
    detector = OnnxDetector(path)
    cases = {
        f"1 image {smallest + 96}x{smallest + 160}": _example_inputs(1, (smallest + 96, smallest + 160), False, 1),
        f"padded batch of 2, {smallest + 64}x{smallest + 32}": _example_inputs(
            2, (smallest + 64, smallest + 32), True, 2
        ),
    }
    differences = {}
    for case, (pixel_values, pixel_mask) in cases.items():
        with torch.no_grad():
            expected = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        got = detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
        differences[case] = max_abs_difference(got, expected)
    worst = max(differences, key=differences.get)
    if not differences[worst] <= TOLERANCE:  # NaN fails too
        raise ExportCheckError(
            f"the exported file differs from the PyTorch model by {differences[worst]:.2e} on the {worst} "
            f"(tolerance {TOLERANCE:.0e}): {differences}"
        )
    return differences
