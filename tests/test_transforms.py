import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from deformable_detr.data.transforms import DetrAugmentation, crop, hflip, resize

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
BOXES = np.asarray([[10, 20, 70, 60], [100, 5, 190, 150], [30, 90, 60, 140], [150, 120, 198, 158]], dtype=np.float32)


def painted_image():
    """200x160, black, with each box filled in its own colour."""
    image = Image.new("RGB", (200, 160))
    draw = ImageDraw.Draw(image)
    for box, colour in zip(BOXES, COLOURS):
        draw.rectangle(box.tolist(), fill=colour)  # PIL fills x0..x1 inclusive: pixels [x0, x1 + 1)
    return image, BOXES + np.asarray([0, 0, 1, 1], dtype=np.float32)


def painted_extent(image, colour):
    """The box (x0, y0, x1, y1) of the pixels closest to `colour`, or None."""
    pixels = np.asarray(image).astype(int)
    mask = np.abs(pixels - colour).sum(-1) < 200
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_each_box_stays_on_its_object():
    image, boxes = painted_image()
    augmentation = DetrAugmentation(image_size=160, max_size=267)
    kinds = set()
    for seed in range(40):
        out, out_boxes, keep = augmentation(image, boxes, random.Random(seed))
        kinds.add((out.size, int(keep.sum())))
        assert min(out.size) in augmentation.scales or max(out.size) == 267
        for box, colour in zip(out_boxes, np.asarray(COLOURS)[keep]):
            extent = painted_extent(out, colour)
            assert extent is not None, (seed, colour)
            np.testing.assert_allclose(box, extent, atol=2.5, err_msg=f"seed {seed}, colour {colour}")
        for colour in np.asarray(COLOURS)[~keep]:
            assert (
                painted_extent(out, colour) is None
                or (painted_extent(out, colour)[2:] - painted_extent(out, colour)[:2]).min() <= 2
            )
    assert len(kinds) > 10  # sizes and crops vary


def test_flip_resize_crop_exact():
    image, boxes = painted_image()
    flipped, flipped_boxes = hflip(image, boxes)
    np.testing.assert_array_equal(flipped_boxes[0], [200 - 71, 20, 200 - 10, 61])
    small, small_boxes = resize(image, boxes, 80, None)
    assert small.size == (100, 80)
    np.testing.assert_allclose(small_boxes, boxes / 2)
    capped, _ = resize(image, boxes, 160, 150)  # the longest side caps the scale
    assert capped.size == (150, 120)
    cropped, cropped_boxes, keep = crop(image, boxes, 40, 30, 100, 100)
    assert cropped.size == (100, 100)
    assert keep.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(cropped_boxes[0], [0, 0, 31, 31])
    np.testing.assert_array_equal(cropped_boxes[1], [60, 0, 100, 100])


def test_multi_scale_sides_are_the_ones_given():
    """--multi_scale "96,128": every augmented image's shortest side is one of them (the longest side allows it)."""
    from deformable_detr.engine import TrainingOptions

    scales = TrainingOptions(dataset="x", config_name="tiny", multi_scale="96, 128").training_scales()
    assert scales == [96, 128]
    augmentation = DetrAugmentation(800, 1333, scales)
    image, boxes = painted_image()
    sides = {min(augmentation(image, boxes, random.Random(seed))[0].size) for seed in range(20)}
    assert sides == {96, 128}
    for bad in ("96,abc", "0,128"):
        with pytest.raises(ValueError, match=f'multi_scale must be positive sides separated by commas, got "{bad}"'):
            TrainingOptions(dataset="x", config_name="tiny", multi_scale=bad)
