"""ONNX export: `export_onnx(model_path, output)` writes a saved Deformable DETR (ours or transformers', a folder or
a Hub id) as one ONNX file of standard operators (opset OPSET: onnxruntime, OpenVINO and TensorRT all run it) with a
dynamic batch, height and width, then checks it in onnxruntime against PyTorch. The `deformable-detr-export`
command in cli.py runs it; onnx_detector.py runs the file.

Multi-scale deformable attention is exported as its grid_sample formulation (one GridSample per level): under
torch.export the op takes its standard-op form by itself (`multi_scale_deformable_attention`), so the fused
kernels stay on in eager mode and nothing needs to be set (measured in onnxruntime on the full-size model, the
alternative, row gathers of the four corners, ran 1.4x slower and took 4x as long to export). torch's exporter
(torch.export + onnxscript) records the graph; its optimiser stays off: measured, it made the export 30% slower
and the file no faster in onnxruntime, which (as OpenVINO and TensorRT) optimises the graph when loading it.
"""

import json
import os
import time

import torch

from .onnx_detector import INPUTS, OUTPUTS, OnnxDetector

OPSET = 18  # GridSample (16+) in every runtime we target; onnxruntime >= 1.14, OpenVINO >= 2023, TensorRT >= 8.6
TOLERANCE = 1e-4  # max abs difference of logits and boxes, fp32, onnxruntime vs PyTorch
MAX_SIDE = 4096


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


def export_onnx(model_path: str, output: str, check: bool = True, opset: int = OPSET) -> dict:
    """Writes `model_path`'s detector to `output` (.onnx) and, with `check`, compares it with PyTorch in
    onnxruntime; -> {"seconds": export time, "max_abs_difference": {case: figure}}. Raises ExportCheckError (a
    ValueError) when a difference exceeds TOLERANCE, ValueError for a model that cannot be exported."""
    from importlib.metadata import version

    from .detect import load_detector

    if not output.endswith(".onnx"):
        raise ValueError(f"output {output!r} must end in .onnx")
    if opset < 16:
        raise ValueError(f"opset {opset}: GridSample, which the attention needs, came in opset 16")
    if os.path.isdir(output):
        raise ValueError(f"output {output!r} is a folder")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)  # before the export: a bad path fails now
    model, processor = load_detector(model_path, "cpu")
    smallest = 2 * (model.model.min_image_size or 32)  # the coarsest map at least 2x2: a real, not a special, size
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=smallest, max=MAX_SIDE)
    width = torch.export.Dim("width", min=smallest, max=MAX_SIDE)
    example = _example_inputs(2, (smallest + 32, smallest + 64), padded=False)  # batch 2: no batch-1 special case
    started = time.time()
    try:
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
    metadata = {
        "id2label": json.dumps({str(k): v for k, v in model.config.id2label.items()}),
        "image_processor": json.dumps(processor.to_dict()),
        "deformable_detr_version": version("hub-deformable-detr"),
    }
    program.model.metadata_props.update(metadata)
    program.save(output)
    report = {"seconds": round(time.time() - started, 1), "max_abs_difference": {}}
    if check:
        report["max_abs_difference"] = check_export(model, output, smallest)
    return report


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
            f"{path} differs from the PyTorch model by {differences[worst]:.2e} on the {worst} "
            f"(tolerance {TOLERANCE:.0e}): {differences}"
        )
    return differences
