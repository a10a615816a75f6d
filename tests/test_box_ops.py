"""Box conversions: known values, round trips, any leading shape, and the box refinement step of the decoder."""

import numpy as np
import pytest
import torch

from deformable_detr.model.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    box_xyxy_to_xywh,
    generalized_box_iou,
    paired_generalized_box_iou,
)
from deformable_detr.model.deformable_transformer import inverse_sigmoid, refine_boxes

XYXY = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 1.0]])
CXCYWH = torch.tensor([[30.0, 50.0, 40.0, 60.0], [0.5, 0.5, 1.0, 1.0]])
XYWH = torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.0, 1.0]])


def random_xyxy(*shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    top_left = torch.rand(*shape, 2, generator=generator) * 100
    return torch.cat([top_left, top_left + torch.rand(*shape, 2, generator=generator) * 50], -1)


@pytest.mark.parametrize(
    "convert, boxes, expected",
    [
        (box_cxcywh_to_xyxy, CXCYWH, XYXY),
        (box_xyxy_to_cxcywh, XYXY, CXCYWH),
        (box_xywh_to_xyxy, XYWH, XYXY),
        (box_xyxy_to_xywh, XYXY, XYWH),
    ],
)
def test_known_values(convert, boxes, expected):
    assert torch.equal(convert(boxes), expected)


@pytest.mark.parametrize(
    "forward, backward", [(box_xyxy_to_cxcywh, box_cxcywh_to_xyxy), (box_xyxy_to_xywh, box_xywh_to_xyxy)]
)
@pytest.mark.parametrize("shape", [(0,), (7,), (2, 3, 5)])
def test_round_trips(forward, backward, shape):
    boxes = random_xyxy(*shape)
    converted = forward(boxes)
    assert converted.shape == boxes.shape and converted.dtype == boxes.dtype
    torch.testing.assert_close(backward(converted), boxes)


def test_same_numbers_as_numpy_slicing():
    """The conversions the image processor made in numpy, bit for bit."""
    boxes = random_xyxy(50, seed=1).numpy()
    coco = boxes.copy()
    coco[:, 2:] -= coco[:, :2]
    np.testing.assert_array_equal(box_xyxy_to_xywh(torch.from_numpy(boxes)).numpy(), coco)
    corners = coco.copy()
    corners[:, 2:] += corners[:, :2]
    np.testing.assert_array_equal(box_xywh_to_xyxy(torch.from_numpy(coco)).numpy(), corners)
    x0, y0, x1, y1 = boxes.T
    centers = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    np.testing.assert_array_equal(box_xyxy_to_cxcywh(torch.from_numpy(boxes)).numpy(), centers)


def test_box_area_and_generalized_box_iou():
    assert torch.equal(box_area(XYXY), torch.tensor([2400.0, 1.0]))
    assert box_area(random_xyxy(2, 3)).shape == (2, 3)
    # identical boxes: 1; disjoint boxes 1 apart in a 3 x 1 hull: 0 - (3 - 2) / 3
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    torch.testing.assert_close(generalized_box_iou(torch.cat([a, b]), a), torch.tensor([[1.0], [-1 / 3]]))
    assert generalized_box_iou(torch.cat([a, b]), torch.cat([a, b])).shape == (2, 2)  # pairwise, also for P == T
    # boxes side by side: one GIoU per pair, as the loss takes them for its matched boxes
    paired = paired_generalized_box_iou(torch.cat([a, b]), torch.cat([a, a]))
    torch.testing.assert_close(paired, torch.tensor([1.0, -1 / 3]))


def test_refine_boxes():
    boxes = torch.tensor([[0.2, 0.4, 0.1, 0.3]])
    points = boxes[:, :2]
    zero = torch.zeros(1, 4)
    torch.testing.assert_close(refine_boxes(boxes, zero), boxes)
    # points give the centre only: the size is the sigmoid of the delta
    torch.testing.assert_close(refine_boxes(points, zero), torch.tensor([[0.2, 0.4, 0.5, 0.5]]))
    delta = torch.tensor([[0.5, -1.0, 2.0, -2.0]])
    torch.testing.assert_close(refine_boxes(boxes, delta), (inverse_sigmoid(boxes) + delta).sigmoid())
    torch.testing.assert_close(refine_boxes(points, delta)[:, 2:], delta[:, 2:].sigmoid())
