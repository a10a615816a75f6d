"""The synthetic shapes data: the demo's set as it always was, and the harder sets of more kinds, overlapping."""

import random

import numpy as np

from deformable_detr.data.shapes import CLASS_NAMES, KINDS, draw_shape, draw_shapes, iou, shapes_dataset


def test_every_kind_draws_inside_its_box_and_differently():
    from PIL import Image, ImageDraw

    masks = []
    for kind in KINDS:
        image = Image.new("L", (40, 40), 0)
        draw_shape(ImageDraw.Draw(image), kind, 5, 7, 24, 255)
        pixels = np.asarray(image) > 0
        ys, xs = np.nonzero(pixels)
        assert (xs.min(), ys.min()) >= (5, 7) and (xs.max(), ys.max()) <= (5 + 23, 7 + 23), kind
        assert xs.min() == 5 or ys.min() == 7, f"{kind} does not reach its box's left or top edge"
        masks.append(pixels)
    for i in range(len(KINDS)):
        for j in range(i):
            assert (masks[i] != masks[j]).sum() > 20, f"{KINDS[i]} looks like {KINDS[j]}"


def test_the_demo_set_keeps_its_shapes_apart():
    _, boxes, categories = draw_shapes(random.Random(3), 128, 4)
    assert 1 <= len(boxes) <= 4 and set(categories) <= set(range(len(CLASS_NAMES)))
    assert all(iou(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[:i])


def test_a_crowded_set_overlaps_up_to_its_limit():
    rng = random.Random(0)
    overlaps, counts = [], []
    for _ in range(20):
        image, boxes, categories = draw_shapes(rng, 192, 40, KINDS, sides=(10, 28), overlap=0.3, stop=0.03)
        counts.append(len(boxes))
        overlaps += [iou(a, b) for i, a in enumerate(boxes) for b in boxes[:i]]
        assert all(10 <= w == h <= 28 and 0 <= x <= 192 - w and 0 <= y <= 192 - h for x, y, w, h in boxes)
        assert set(categories) <= set(range(len(KINDS)))
    assert max(overlaps) <= 0.3 and sum(o > 0 for o in overlaps) > 20  # they do overlap, within the limit
    assert np.mean(counts) > 15


def test_a_dataset_names_its_kinds():
    dataset = shapes_dataset(3, 64, seed=1, kinds=["star", "cross"])
    assert dataset.features["objects"]["category"].feature.names == ["star", "cross"]
    assert all(set(row["objects"]["category"]) <= {0, 1} for row in dataset)
