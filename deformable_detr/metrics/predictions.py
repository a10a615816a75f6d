"""A model's detections for PIL images, in pixels, and the check that its outputs are finite."""

import warnings

import torch
from PIL import Image

from ..data.image_files import SHOWN
from ..utils.messages import listed


def not_finite(outputs) -> list[int]:
    """The images of a batch whose class logits or boxes hold a NaN or an infinity (NaN pixels, NaN weights, an
    overflow in half precision): their detections would silently be none."""
    finite = outputs.logits.isfinite().flatten(1).all(1) & outputs.pred_boxes.isfinite().flatten(1).all(1)
    return [i for i, ok in enumerate(finite.tolist()) if not ok]


def warn_of_non_finite_outputs(names: list[str]):
    """One warning naming the images whose outputs were not finite."""
    if names:
        warnings.warn(
            f"the model's outputs for {len(names)} image(s) are not finite (NaN or inf), so they have no "
            f"detections: {listed(names, SHOWN)}; check these images and the model's weights",
            RuntimeWarning,
            stacklevel=2,
        )


def detect(model, processor, images: list[Image.Image], threshold: float, top_k: int) -> tuple[list[list[dict]], list]:
    """-> (the detections of each image, boxes as x0, y0, x1, y1 pixels clipped to the image, and the indices of
    images whose outputs were not finite)."""
    inputs = processor(images, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = [(im.height, im.width) for im in images]
    results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes, top_k=top_k)
    id2label = model.config.id2label
    detections = [
        [
            {
                "label": id2label.get(label, str(label)),
                "label_id": label,
                "score": round(s, 5),
                "box": [round(min(max(v, 0.0), side), 2) for v, side in zip(b, (w, h, w, h))],
            }
            for s, label, b in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist())
        ]
        for r, (h, w) in zip(results, sizes)
    ]
    return detections, not_finite(outputs)


def of_classes(detections: list[dict], class_ids: set[int] | None) -> list[dict]:
    """The detections (as `detect` gives them) of the classes `class_ids`; all of them where None."""
    return detections if class_ids is None else [det for det in detections if det["label_id"] in class_ids]
