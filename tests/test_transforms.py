import random

import numpy as np
import pytest
import torch
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


def jpeg_rows(tmp_path, images_and_boxes, classes=3):
    """Rows of the training schema of (PIL image, (N, 4) xyxy boxes) pairs, the images JPEG files in tmp_path."""
    from deformable_detr.data.schema import records_to_dataset

    records = []
    for index, (image, boxes) in enumerate(images_and_boxes):
        path = str(tmp_path / f"{index}.jpg")
        image.save(path, quality=95)
        bbox = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in np.asarray(boxes).tolist()]
        objects = {"id": list(range(len(bbox))), "area": [w * h for _, _, w, h in bbox], "bbox": bbox}
        objects["category"] = [i % classes for i in range(len(bbox))]
        records.append({"image": path, "image_id": index, "width": image.width, "height": image.height})
        records[-1]["objects"] = objects
    return records_to_dataset(records, [f"class {i}" for i in range(classes)])


def bccd_rows(tmp_path, scale: int):
    """Four BCCD photos (640x480) with their boxes, enlarged `scale` times, as JPEG rows."""
    from tests.support.bccd import bccd_example

    pairs = []
    for name in ("BloodImage_00000", "BloodImage_00001", "BloodImage_00002", "BloodImage_00003"):
        image, annotation = bccd_example(name)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in annotation["annotations"])]
        image = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.BICUBIC)
        pairs.append((image, np.asarray(boxes, dtype=np.float32) * scale))
    return jpeg_rows(tmp_path, pairs)


def collated(rows, reduced_decoding: bool, seed: int, epochs=range(4)):
    """The training batches of two samples of `rows` (DETR augmentation at 800 px), a few epochs of them."""
    from deformable_detr import DeformableDetrImageProcessor
    from deformable_detr.data.samples import DetectionCollator, DetectionSamples

    samples = DetectionSamples(rows, DetrAugmentation(800, 1333), seed, reduced_decoding=reduced_decoding)
    collate = DetectionCollator(DeformableDetrImageProcessor(do_resize=False))
    batches = []
    for epoch in epochs:
        samples.set_epoch(epoch)
        batches += [collate([samples[i], samples[i + 1]]) for i in range(0, len(samples), 2)]
    return batches


def test_training_batches_are_the_float_arithmetic_s_bit_for_bit_where_nothing_decodes_reduced(tmp_path):
    """640x480 photos are never resized to half their size at 800 px: reduced decoding changes nothing, and the
    collator's batch is bit for bit the processor's float arithmetic on the same augmented images."""
    from deformable_detr import DeformableDetrImageProcessor
    from deformable_detr.data.samples import DetectionCollator, DetectionSamples

    rows = bccd_rows(tmp_path, 1)
    reduced, full = collated(rows, True, seed=5), collated(rows, False, seed=5)
    for a, b in zip(reduced, full, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_mask"], b["pixel_mask"])
        assert torch.equal(a["orig_sizes"], b["orig_sizes"])
        for x, y in zip(a["labels"], b["labels"], strict=True):
            assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
    assert len({tuple(b["pixel_values"].shape) for b in full}) > 3  # the augmentation varies the sizes
    samples = DetectionSamples(rows, DetrAugmentation(800, 1333), 5)
    pair = [samples[0], samples[1]]
    batch = DetectionCollator(DeformableDetrImageProcessor(do_resize=False))(pair)
    floats = DeformableDetrImageProcessor(do_resize=False, boxes_relative_to="image")(
        [np.asarray(s["image"], dtype=np.float32) for s in pair],
        annotations=[s["annotation"] for s in pair],
        return_tensors="pt",
        input_data_format="channels_last",
    )
    assert torch.equal(batch["pixel_values"], floats["pixel_values"])
    assert torch.equal(batch["pixel_mask"], floats["pixel_mask"])
    for x, y in zip(batch["labels"], floats["labels"], strict=True):
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_reduced_decoding_of_large_jpegs_stays_within_its_tolerance(tmp_path):
    """2560x1920 photos, resized by the augmentation to half their size or less: decoded at 1/2 or 1/4 of it,
    the same image sizes, masks and labels (boxes bit for bit), pixel values within a mean absolute difference
    of 0.01 (normalised, about 0.6 of a grey level) and a largest one of 0.2."""
    rows = bccd_rows(tmp_path, 4)
    reduced, full = collated(rows, True, seed=1), collated(rows, False, seed=1)
    for a, b in zip(reduced, full, strict=True):
        assert torch.equal(a["pixel_mask"], b["pixel_mask"])
        for x, y in zip(a["labels"], b["labels"], strict=True):
            assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)
        difference = (a["pixel_values"] - b["pixel_values"]).abs()
        assert 0 < difference.sum() / (a["pixel_mask"].sum() * 3) <= 0.01
        assert difference.max() <= 0.2


def test_reduced_decoding_keeps_each_box_on_its_object(tmp_path):
    """The painted boxes, 4x larger, in JPEGs whose EXIF orientation turns them (6: a quarter turn) or not: each
    box of a sample decoded at a reduced size still lies on its colour."""
    from deformable_detr.data.samples import DetectionSamples, opened

    image, boxes = painted_image()
    large, large_boxes = image.resize((800, 640), Image.NEAREST), boxes * 4
    turned = large.transpose(Image.ROTATE_90)  # stored turned back: orientation 6 shows it as `large`
    exif = Image.Exif()
    exif[0x0112] = 6
    turned_path = tmp_path / "turned" / "0.jpg"
    rows = jpeg_rows(tmp_path, [(large, large_boxes)], classes=4)
    (tmp_path / "turned").mkdir()
    rows_turned = jpeg_rows(tmp_path / "turned", [(large, large_boxes)], classes=4)
    turned.save(turned_path, quality=95, exif=exif)
    for dataset in (rows, rows_turned):
        samples = DetectionSamples(dataset, DetrAugmentation(image_size=160, max_size=267), seed=0)
        assert opened(samples.rows[0]["image"]).format == "JPEG"
        for epoch in range(12):
            samples.set_epoch(epoch)
            sample = samples[0]
            annotation = sample["annotation"]["annotations"]
            assert min(sample["image"].size) in samples.augmentation.scales or max(sample["image"].size) == 267
            for o in annotation:
                x, y, w, h = o["bbox"]
                extent = painted_extent(sample["image"], COLOURS[o["category_id"]])
                np.testing.assert_allclose([x, y, x + w, y + h], extent, atol=3, err_msg=f"epoch {epoch}")
