"""Box conversions and overlaps. Boxes are (cx, cy, w, h), (x0, y0, x1, y1) or, as in COCO, (x0, y0, w, h), in the
last dimension."""

import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x0, y0, x1, y1."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0, y0, x1, y1 -> (..., 4) cx, cy, w, h."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0, y0, w, h (COCO) -> (..., 4) x0, y0, x1, y1."""
    top_left, size = boxes.split(2, -1)
    return torch.cat([top_left, top_left + size], -1)


def box_xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0, y0, x1, y1 -> (..., 4) x0, y0, w, h (COCO)."""
    top_left, bottom_right = boxes.split(2, -1)
    return torch.cat([top_left, bottom_right - top_left], -1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x0, y0, x1, y1 -> (...,) areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes: (P, 4), (T, 4) -> (P, T), in [-1, 1]."""
    return paired_generalized_box_iou(a[:, None], b[None])


def _paired_intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inter = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter[..., 0] * inter[..., 1]
    return inter, box_area(a) + box_area(b) - inter


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes side by side: a (..., 4) and b (..., 4), broadcast against each other -> (...)."""
    inter, union = _paired_intersection_union(a, b)
    return inter / union


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of xyxy boxes side by side: a (..., 4) and b (..., 4), broadcast against each other -> (...)."""
    inter, union = _paired_intersection_union(a, b)
    hull = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull[..., 0] * hull[..., 1]
    return inter / union - (hull - union) / hull


def coco_area(box: list, area: float | None = None) -> float:
    """The area of an object whose COCO box is `box` (x, y, w, h): `area` where the annotation gives one, else the
    box's w * h, as COCO's own boxes without a segmentation have it."""
    return box[2] * box[3] if area is None else area
