"""The processor's per-call keywords, segmentation masks, COCO panoptic annotations and public methods, each against
transformers' DeformableDetrImageProcessorPil: the same keywords give the same pixel_values and labels."""

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_utils import SizeDict
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import DeformableDetrImageProcessorPil

from deformable_detr import DeformableDetrImageProcessor
from tests.support.bccd import bccd_example


def assert_same(theirs, ours, atol=1e-5):
    """pixel_values within `atol`, pixel_mask equal, labels with the same keys, shapes, dtypes and values."""
    assert set(theirs) == set(ours)
    a, b = np.asarray(theirs["pixel_values"]), np.asarray(ours["pixel_values"])
    assert a.shape == b.shape and np.abs(a - b).max() <= atol
    if "pixel_mask" in theirs:
        assert np.array_equal(np.asarray(theirs["pixel_mask"]), np.asarray(ours["pixel_mask"]))
    for a, b in zip(theirs.get("labels", []), ours.get("labels", []), strict=True):
        assert set(a) == set(b)
        for key in a:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.shape == y.shape and x.dtype == y.dtype, key
            assert np.allclose(x.astype(np.float64), y.astype(np.float64), atol=atol), key


def bccd_pair():
    images, annotations = zip(
        *(bccd_example(name, i) for i, name in enumerate(["BloodImage_00000", "BloodImage_00100"]))
    )
    return [images[0], images[1].resize((320, 400))], list(annotations)


CALL_KEYWORDS = [
    {"do_resize": False, "do_pad": True},
    {"size": {"shortest_edge": 200, "longest_edge": 300}},
    {"size": {"max_height": 300, "max_width": 200}},
    {"size": {"height": 128, "width": 96}},
    {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4]},
    {"do_rescale": False, "do_normalize": False},
    {"rescale_factor": 1 / 127},
    {"do_normalize": False},
    {"do_pad": False, "size": {"height": 128, "width": 96}},
    {"pad_size": {"height": 1400, "width": 1400}},
    {"do_convert_annotations": False},
    {"format": "coco_detection"},
    {"resample": Image.NEAREST},
    {"return_tensors": "np"},
]


@pytest.mark.parametrize("keywords", CALL_KEYWORDS, ids=str)
def test_every_call_keyword_same_as_transformers(keywords):
    """Every option transformers' processor takes per call is taken per call, with the same outputs."""
    images, annotations = bccd_pair()
    keywords = {"return_tensors": "pt", **keywords}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BloodImage_00100's box with no area is dropped
        theirs = DeformableDetrImageProcessorPil()(images, annotations=annotations, **keywords)
        ours = DeformableDetrImageProcessor()(images, annotations=annotations, **keywords)
    if keywords.get("do_resize") is False:  # the same size as the canvas: transformers leaves out `size`
        for label in theirs["labels"]:
            label["size"] = torch.tensor([480, 640])
    assert_same(theirs, ours)


def test_a_call_keyword_is_for_that_call_only_and_checked():
    image, _ = bccd_example("BloodImage_00000")
    processor = DeformableDetrImageProcessor()
    assert processor(image, size={"height": 64, "width": 48}, return_tensors="pt")["pixel_values"].shape == (
        1,
        3,
        64,
        48,
    )
    assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 800, 1066)
    for keywords, error, message in (
        ({"size": {"shortest_edge": 800}}, ValueError, "size must have the keys"),
        (
            {"pad_size": {"max_height": 9, "max_width": 9}},
            ValueError,
            "pad_size must have the keys \\['height', 'width'\\]",
        ),
        ({"image_std": [0.2, 0.0, 0.2]}, ValueError, "image_std must not hold 0"),
        ({"image_mean": [0.5, 0.5]}, ValueError, "image_mean must be finite numbers, .* \\(1, 3 or 4 of them\\)"),
        ({"image_mean": [0.5] * 4}, ValueError, "image_mean has 4 values for images of 3 channels"),
        ({"do_resize": "yes"}, ValueError, "do_resize must be True or False, got 'yes'"),
        ({"format": "coco_keypoints"}, ValueError, "format must be one of \\['coco_detection', 'coco_panoptic'\\]"),
        ({"rescale_factor": 0}, ValueError, "rescale_factor must be a positive number"),
        ({"data_format": "chw"}, ValueError, 'data_format must be "channels_first" or "channels_last"'),
        ({"input_data_format": "chw"}, ValueError, 'input_data_format must be "channels_first" or "channels_last"'),
        ({"do_center_crop": True}, ValueError, "does not center-crop"),
        ({"do_resise": False}, TypeError, "unknown argument\\(s\\) \\['do_resise'\\]; the processor takes"),
    ):
        with pytest.raises(error, match=message):
            processor(image, **keywords)


def test_channel_layouts_and_four_channels_same_as_transformers():
    """input_data_format settles (3, 3, 3); do_convert_rgb=False keeps 4 or 1 channels, normalised per channel."""
    rng = np.random.default_rng(0)
    cube = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
    four = rng.integers(0, 256, (50, 60, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (1, 30, 40), dtype=np.uint8)
    for image, keywords in (
        (cube, {"input_data_format": "channels_first"}),
        (cube, {"input_data_format": "channels_last"}),
        (
            four,
            {
                "do_convert_rgb": False,
                "input_data_format": "channels_last",
                "image_mean": [0.1] * 4,
                "image_std": [0.5] * 4,
            },
        ),
        (gray, {"do_convert_rgb": False, "image_mean": [0.5], "image_std": [0.5]}),
    ):
        theirs = DeformableDetrImageProcessorPil()(image, return_tensors="pt", **keywords)
        ours = DeformableDetrImageProcessor()(image, return_tensors="pt", **keywords)
        assert_same(theirs, ours)
    # rescaled to 4x4: the same pixels either way round, but channels first
    assert not torch.equal(
        DeformableDetrImageProcessor()(cube, input_data_format="channels_first", return_tensors="pt")["pixel_values"],
        DeformableDetrImageProcessor()(cube, input_data_format="channels_last", return_tensors="pt")["pixel_values"],
    )


def test_data_format_channels_last_gives_pixels_channels_last():
    """transformers 5's processor ignores data_format; ours gives what it names."""
    image, _ = bccd_example("BloodImage_00000")
    processor = DeformableDetrImageProcessor(size={"height": 64, "width": 48})
    first = processor(image, return_tensors="pt")["pixel_values"]
    last = processor(image, data_format="channels_last", return_tensors="pt")["pixel_values"]
    assert last.shape == (1, 64, 48, 3) and torch.equal(last.permute(0, 3, 1, 2), first)


@pytest.mark.parametrize("value", [0.0, 2.0, np.int64(2), np.float32(1.0), np.uint8(1)], ids=repr)
def test_whole_number_category_ids_are_taken(value):
    """A whole-number category_id of any type is taken: albumentations (in transformers' example scripts) hands
    it over as 0.0."""
    image, annotation = bccd_example("BloodImage_00000")
    annotation = {"image_id": 4, "annotations": [o | {"category_id": value} for o in annotation["annotations"][:2]]}
    labels = DeformableDetrImageProcessor()(image, annotations=annotation, return_tensors="pt")["labels"][0]
    assert labels["class_labels"].tolist() == [int(value)] * 2 and labels["class_labels"].dtype == torch.int64


@pytest.mark.parametrize("value", [0.5, float("nan"), "1", None])
def test_other_category_ids_name_the_object(value):
    image, annotation = bccd_example("BloodImage_00000")
    objects = annotation["annotations"]
    annotation = {"image_id": 4, "annotations": [objects[0], objects[1] | {"category_id": value}]}
    with pytest.raises(ValueError, match="image_id 4, object 1: needs an integer 'category_id'"):
        DeformableDetrImageProcessor()(image, annotations=annotation)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """A (h, w) mask as COCO's uncompressed RLE: run lengths in column-major order, starting with zeros."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    return {"size": list(mask.shape), "counts": np.diff(np.r_[0, edges]).tolist()}


def segmented_example():
    """Two images with polygon and RLE segmentations, one object with no area (dropped with its mask)."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (80, 50))]
    blob = np.zeros((60, 90), dtype=bool)
    blob[10:30, 20:70] = True
    polygon = [[10, 5, 40, 5, 40, 25, 10, 25]]
    annotations = [
        {
            "image_id": 1,
            "annotations": [
                {"bbox": [10, 5, 30, 20], "category_id": 3, "area": 400, "segmentation": polygon},
                {"bbox": [20, 10, 50, 20], "category_id": 1, "area": 1000, "segmentation": uncompressed_rle(blob)},
                {"bbox": [0, 0, 0, 0], "category_id": 2, "area": 0, "segmentation": [[0, 0, 1, 0, 1, 1]]},
            ],
        },
        {
            "image_id": 2,
            "annotations": [
                {
                    "bbox": [5, 5, 20, 30],
                    "category_id": 4,
                    "area": 600,
                    "segmentation": [[5, 5, 25, 5, 25, 35], [0, 0, 3, 0, 3, 3]],
                }
            ],
        },
    ]
    return images, annotations, blob


@pytest.mark.parametrize(
    "keywords",
    [{}, {"do_resize": False}, {"size": {"height": 100, "width": 100}}, {"do_convert_annotations": False}],
    ids=str,
)
def test_segmentation_masks_same_as_transformers(keywords):
    images, annotations, _ = segmented_example()
    keywords = {"return_tensors": "pt", "return_segmentation_masks": True, **keywords}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeformableDetrImageProcessorPil()(images, annotations=annotations, **keywords)
        ours = DeformableDetrImageProcessor()(images, annotations=annotations, **keywords)
    assert_same(theirs, ours)
    assert ours["labels"][0]["masks"].shape == (2, *ours["pixel_values"].shape[2:])


def test_compressed_rle_and_the_errors_of_segmentation_masks(monkeypatch):
    """transformers cannot read a compressed RLE (its counts a string); ours decodes it with pycocotools."""
    from pycocotools import mask as coco_mask

    images, annotations, blob = segmented_example()
    compressed = coco_mask.encode(np.asfortranarray(blob.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    objects = annotations[0]["annotations"]
    annotation = {"image_id": 1, "annotations": [objects[1] | {"segmentation": compressed}]}
    processor = DeformableDetrImageProcessor(do_resize=False)
    masks = processor(images[0], annotations=annotation, return_segmentation_masks=True)["labels"][0]["masks"]
    assert np.array_equal(masks[0], blob)
    without = {"image_id": 1, "annotations": [{k: v for k, v in objects[0].items() if k != "segmentation"}]}
    with pytest.raises(ValueError, match="image_id 1, object 0: return_segmentation_masks needs its 'segmentation'"):
        processor(images[0], annotations=without, return_segmentation_masks=True)
    too_large = {"image_id": 1, "annotations": [objects[1] | {"segmentation": uncompressed_rle(np.zeros((9, 9)))}]}
    with pytest.raises(ValueError, match="image_id 1, object 0: its segmentation is 9x9, the image 60x90"):
        processor(images[0], annotations=too_large, return_segmentation_masks=True)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    with pytest.raises(ImportError, match="return_segmentation_masks=True needs pycocotools"):
        processor(images[0], annotations=annotation, return_segmentation_masks=True)
    assert "masks" not in processor(images[0], annotations=annotation)["labels"][0]  # no masks asked: no pycocotools


def panoptic_png(path, ids: np.ndarray):
    """A COCO panoptic PNG: segment id = R + 256 G + 256² B."""
    Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)).save(path)


def panoptic_example(folder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((60, 90), (80, 50))]
    ids = np.full((60, 90), 5)
    ids[10:40, 10:50] = 70000
    ids[45:, 60:] = 300
    panoptic_png(folder / "a.png", ids)
    ids = np.full((80, 50), 7)
    ids[:20] = 8
    panoptic_png(folder / "b.png", ids)
    segments = [(5, 1, 10, 0), (70000, 2, 11, 1), (300, 3, 12, 0)]
    annotations = [
        {
            "image_id": 1,
            "file_name": "a.png",
            "segments_info": [dict(zip(("id", "category_id", "area", "iscrowd"), s)) for s in segments],
        },
        {
            "image_id": 2,
            "file_name": "b.png",
            "segments_info": [
                {"id": 8, "category_id": 4, "area": 3, "iscrowd": 0},
                {"id": 7, "category_id": 5.0, "area": 4, "iscrowd": 0},
            ],
        },
    ]
    return images, annotations


@pytest.mark.parametrize(
    "keywords",
    [
        {},
        {"return_segmentation_masks": False},
        {"do_convert_annotations": False},
        {"size": {"max_height": 200, "max_width": 100}},
    ],
    ids=str,
)
@pytest.mark.parametrize("per_call", [False, True])
def test_coco_panoptic_same_as_transformers(tmp_path, keywords, per_call):
    images, annotations = panoptic_example(tmp_path)
    keywords = {"return_tensors": "pt", "masks_path": tmp_path, **keywords}
    created = {} if per_call else {"format": "coco_panoptic"}
    called = keywords | ({"format": "coco_panoptic"} if per_call else {})
    theirs = DeformableDetrImageProcessorPil(**created)(images, annotations=annotations, **called)
    ours = DeformableDetrImageProcessor(**created)(images, annotations=annotations, **called)
    assert_same(theirs, ours)
    labels = ours["labels"][0]
    assert labels["class_labels"].tolist() == [1, 2, 3] and labels["iscrowd"].tolist() == [0, 1, 0]
    assert ("masks" in labels) == keywords.get("return_segmentation_masks", True)


def test_coco_panoptic_errors_name_what_is_wrong(tmp_path):
    images, annotations = panoptic_example(tmp_path)
    processor = DeformableDetrImageProcessor(format="coco_panoptic")
    with pytest.raises(
        ValueError, match="coco_panoptic annotations need masks_path, the folder of their PNGs; got None"
    ):
        processor(images[0], annotations=annotations[0])
    with pytest.raises(ValueError, match="annotation 0 must be a COCO panoptic dict"):
        processor(images[0], annotations={"image_id": 1, "annotations": []}, masks_path=tmp_path)
    missing = annotations[0] | {"segments_info": annotations[0]["segments_info"] + [{"id": 99, "category_id": 1}]}
    with pytest.raises(ValueError, match="image_id 1: segment id\\(s\\) \\[99\\] of its segments_info are not in"):
        processor(images[0], annotations=missing, masks_path=tmp_path)
    with pytest.raises(ValueError, match="b.png is 80x50, its image 60x90"):
        processor(images[0], annotations=annotations[0] | {"file_name": "b.png"}, masks_path=tmp_path)
    with pytest.raises(ValueError, match="image_id 1, segment 0: needs an 'id' and an integer 'category_id'"):
        processor(images[0], annotations=annotations[0] | {"segments_info": [{"id": 5}]}, masks_path=tmp_path)


def test_public_methods_same_as_transformers():
    """pad, resize, resize_annotation and normalize_annotation take transformers' arguments and give its results."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 40, 70), dtype=np.uint8)
    theirs, ours = DeformableDetrImageProcessorPil(), DeformableDetrImageProcessor()
    for size in (
        {"shortest_edge": 20, "longest_edge": 30},
        {"max_height": 50, "max_width": 50},
        {"height": 33, "width": 44},
    ):
        assert np.array_equal(theirs.resize(image, SizeDict(**size)), ours.resize(image, size))
        assert np.array_equal(ours.resize(image, SizeDict(**size)), ours.resize(image, size))
    annotation = {
        "boxes": np.array([[1, 2, 30, 20], [0, 0, 70, 40]], np.float32),
        "area": np.array([5.0, 6.0], np.float32),
        "masks": rng.integers(0, 2, (2, 40, 70)).astype(bool),
        "class_labels": np.array([1, 2]),
    }

    def same(a, b):
        assert set(a) == set(b)
        for key in a:
            x, y = np.asarray(a[key]), np.asarray(b[key])
            assert x.dtype == y.dtype and np.allclose(x.astype(float), y.astype(float)), key

    same(
        theirs.resize_annotation(annotation, (40, 70), (20, 35)), ours.resize_annotation(annotation, (40, 70), (20, 35))
    )
    normalized = ours.normalize_annotation(annotation, (40, 70))
    same(theirs.normalize_annotation(annotation, (40, 70)), normalized)
    floats = image.astype(np.float32) / 255
    # transformers' pad scales the boxes it is given in place: each gets its own copy
    *a, annotation_a = theirs.pad(floats, (50, 80), annotation=copy.deepcopy(normalized), update_bboxes=True)
    *b, annotation_b = ours.pad(floats, (50, 80), annotation=copy.deepcopy(normalized), update_bboxes=True)
    assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b))
    same(annotation_a, annotation_b)
    assert np.array_equal(
        ours.pad(floats, (50, 80), annotation=dict(normalized), update_bboxes=False)[2]["boxes"], normalized["boxes"]
    )
    with pytest.raises(ValueError, match="the image is 40x70, larger than the padded size 30x80"):
        ours.pad(floats, (30, 80))


def test_options_as_transformers_older_configs_and_defaults_give_them():
    """pad_and_return_pixel_mask is do_pad; without do_convert_annotations, boxes are normalised with the pixels."""
    assert DeformableDetrImageProcessor(pad_and_return_pixel_mask=False).do_pad is False
    assert DeformableDetrImageProcessor(pad_and_return_pixel_mask=False, do_pad=True).do_pad is True
    for do_normalize in (True, False):
        theirs = DeformableDetrImageProcessorPil(do_normalize=do_normalize)
        assert (
            DeformableDetrImageProcessor(do_normalize=do_normalize).do_convert_annotations
            is theirs.do_convert_annotations
        )


@pytest.mark.parametrize("use_fast", [None, False, True])
def test_the_object_detection_example_scripts_use(tmp_path, use_fast):
    """run_object_detection.py: AutoImageProcessor.from_pretrained with size, pad_size and use_fast; numpy images
    from albumentations with float category ids; labels and post-processing as its compute_metrics uses them."""
    from deformable_detr.model.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

    DeformableDetrImageProcessor().save_pretrained(tmp_path)
    options = dict(
        do_resize=True, size={"max_height": 600, "max_width": 600}, do_pad=True, pad_size={"height": 600, "width": 600}
    )
    fast = {} if use_fast is None else {"use_fast": use_fast}  # the script's default: True
    processor = AutoImageProcessor.from_pretrained(tmp_path, **fast, **options)
    assert type(processor) is DeformableDetrImageProcessor
    assert processor.size == {"max_height": 600, "max_width": 600} and processor.pad_size == {
        "height": 600,
        "width": 600,
    }
    images, annotations = bccd_pair()
    images = [np.array(image.convert("RGB")) for image in images]
    for annotation in annotations:
        annotation["annotations"] = [
            {
                "image_id": annotation["image_id"],
                "category_id": float(o["category_id"]),
                "iscrowd": 0,
                "area": o["area"],
                "bbox": list(o["bbox"]),
            }
            for o in annotation["annotations"]
        ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = processor(images=images, annotations=annotations, return_tensors="pt")
        theirs = DeformableDetrImageProcessorPil(**options)(images=images, annotations=annotations, return_tensors="pt")
    assert_same(theirs, ours)
    assert ours["pixel_values"].shape == (2, 3, 600, 600)
    sizes = torch.tensor([label["orig_size"].tolist() for label in ours["labels"]])
    g = torch.Generator().manual_seed(0)
    outputs = DeformableDetrObjectDetectionOutput(
        logits=torch.randn(2, 20, 3, generator=g), pred_boxes=torch.rand(2, 20, 4, generator=g) * 0.5 + 0.1
    )
    for a, b in zip(
        DeformableDetrImageProcessorPil().post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes),
        processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes),
        strict=True,
    ):
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["boxes"], b["boxes"], atol=1e-4)


def test_keypoints_pass_through_as_in_transformers():
    """COCO keypoints come out as (T * K, 3), in the original image's pixels, for the objects kept."""
    image, annotation = bccd_example("BloodImage_00000")
    objects = [o | {"keypoints": [o["bbox"][0], o["bbox"][1], 2, 1.0, 2.0, 1]} for o in annotation["annotations"][:3]]
    objects[1]["bbox"] = [5000, 5000, 10, 10]  # outside the image: dropped with its keypoints
    annotation = {"image_id": 0, "annotations": objects}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeformableDetrImageProcessorPil()(image, annotations=annotation, return_tensors="pt")
        ours = DeformableDetrImageProcessor()(image, annotations=annotation, return_tensors="pt")
    assert_same(theirs, ours)
    assert ours["labels"][0]["keypoints"].shape == (4, 3)
