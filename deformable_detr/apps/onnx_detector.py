"""Running an exported ONNX file (onnx_export.py) with onnxruntime: `OnnxDetector` takes the place of the PyTorch
model in `detect` and the commands (`--model model.onnx`), with the pre- and post-processing stored in the file.

The file's metadata (METADATA_KEYS) holds what running it needs beyond the graph: id2label, the image processor's
settings, the package version that wrote it and the model's smallest image side (min_image_size: thinner inputs are
padded and masked up to it). Inputs: `pixel_values` (B, 3, H, W) float32 and `pixel_mask`
(B, H, W) int64 (1 on real pixels; all ones for an unpadded batch); outputs: `logits` (B, Q, num_labels) and
`pred_boxes` (B, Q, 4) as normalised (cx, cy, w, h), as the PyTorch model's.
"""

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

METADATA_KEYS = ("id2label", "image_processor", "deformable_detr_version", "min_image_size")
INPUTS = ("pixel_values", "pixel_mask")
OUTPUTS = ("logits", "pred_boxes")


@dataclass
class OnnxOutputs:
    """What post_process_object_detection reads of the model's outputs."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor


class OnnxDetector:
    """An exported Deformable DETR in onnxruntime, called as the PyTorch model is (by detect and evaluate):
    `detector(pixel_values=..., pixel_mask=None)` -> outputs with `logits` and `pred_boxes` (torch tensors).
    `detector.config.id2label` and `detector.image_processor()` come from the file's metadata.

        detector = OnnxDetector("model.onnx")
        detections, _ = detect(detector, detector.image_processor(), images, threshold=0.5, top_k=100)
    """

    device = torch.device("cpu")  # inputs are handed over as numpy arrays

    def __init__(self, path: str, providers: list[str] | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ImportError(
                "running an ONNX model needs onnxruntime: pip install 'hub-deformable-detr[onnx]'"
            ) from error
        try:
            self.session = onnxruntime.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own exception types
            raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({error})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in METADATA_KEYS if key not in metadata]
        if missing or [i.name for i in self.session.get_inputs()] != list(INPUTS):
            raise ValueError(
                f"{path}: not a Deformable DETR exported by deformable-detr-export (metadata {sorted(metadata)}, "
                f"inputs {[i.name for i in self.session.get_inputs()]})"
            )
        self.path, self.metadata = path, metadata
        id2label = {int(k): v for k, v in json.loads(metadata["id2label"]).items()}
        self.config = SimpleNamespace(id2label=id2label, num_labels=len(id2label))

    def image_processor(self):
        from ..model.image_processing_deformable_detr import DeformableDetrImageProcessor

        return DeformableDetrImageProcessor(**json.loads(self.metadata["image_processor"]))

    training = False  # with eval() and train(), what `evaluate` uses of a torch module: the file only infers

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **_) -> OnnxOutputs:
        values = pixel_values.detach().cpu().float().numpy()
        if pixel_mask is None:
            mask = np.ones((values.shape[0], *values.shape[2:]), dtype=np.int64)
        else:
            mask = pixel_mask.detach().cpu().to(torch.int64).numpy()
        side = int(self.metadata["min_image_size"])
        height, width = values.shape[2:]
        if min(height, width) < side:  # padded and masked up to the coarsest stride, as the PyTorch model does
            bottom, right = max(0, side - height), max(0, side - width)
            values = np.pad(values, ((0, 0), (0, 0), (0, bottom), (0, right)))
            mask = np.pad(mask, ((0, 0), (0, bottom), (0, right)))
        logits, boxes = self.session.run(list(OUTPUTS), {"pixel_values": values, "pixel_mask": mask})
        return OnnxOutputs(torch.from_numpy(logits), torch.from_numpy(boxes))
