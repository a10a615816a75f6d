"""Our image processor against transformers' DeformableDetrImageProcessorPil, and its own behaviour."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.deformable_detr.image_processing_pil_deformable_detr import DeformableDetrImageProcessorPil

from deformable_detr import DeformableDetrImageProcessor
from tests.support.bccd import bccd_example

BCCD_NAMES = ["BloodImage_00000", "BloodImage_00338", "BloodImage_00343", "BloodImage_00100"]


def compare(theirs, ours):
    assert (theirs["pixel_values"] - ours["pixel_values"]).abs().max() <= 1e-3
    assert torch.equal(theirs["pixel_mask"], ours["pixel_mask"])
    for a, b in zip(theirs.get("labels", []), ours.get("labels", []), strict=True):
        assert set(a) == set(b)
        for key in a:
            assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


def test_same_as_transformers_on_bccd_with_annotations():
    images, annotations = zip(*(bccd_example(name, i) for i, name in enumerate(BCCD_NAMES)))
    theirs = DeformableDetrImageProcessorPil()(list(images), annotations=list(annotations), return_tensors="pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = DeformableDetrImageProcessor()(list(images), annotations=list(annotations), return_tensors="pt")
    compare(theirs, ours)
    # BCCD's two zero-area boxes are dropped, with one warning that counts them and names their images
    dropped = [str(w.message) for w in caught if "no area" in str(w.message)]
    assert dropped == ["dropped 2 box(es) with no area inside their image (image_id 1: 1, image_id 2: 1)"]


def odd_images():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (61, 83, 1), dtype=np.uint8)], -1)
    return {
        "grayscale": [Image.fromarray(rgb[..., 0], "L")],
        "rgba": [Image.fromarray(rgba, "RGBA")],
        "elongated": [Image.fromarray(rng.integers(0, 256, (20, 900, 3), dtype=np.uint8))],
        "batch of sizes": [Image.fromarray(rgb), Image.fromarray(rng.integers(0, 256, (120, 40, 3), dtype=np.uint8))],
        "numpy channels last": [rgb],
        "numpy channels first": [rgb.transpose(2, 0, 1).copy()],
        "torch": [torch.from_numpy(rgb.transpose(2, 0, 1).copy())],
    }


@pytest.mark.parametrize("kind", odd_images())
def test_same_as_transformers_on_odd_images(kind):
    images = odd_images()[kind]
    # transformers needs do_convert_rgb for grayscale and RGBA; we convert always
    theirs = DeformableDetrImageProcessorPil(do_convert_rgb=kind in ("grayscale", "rgba"))(images, return_tensors="pt")
    compare(theirs, DeformableDetrImageProcessor()(images, return_tensors="pt"))


@pytest.mark.parametrize(
    "options",
    [
        {"size": {"max_height": 300, "max_width": 200}},
        {"size": {"height": 128, "width": 96}},
        {"size": {"shortest_edge": 64, "longest_edge": 100}, "pad_size": {"height": 128, "width": 128}},
    ],
)
def test_same_as_transformers_with_other_sizes(options):
    image, annotation = bccd_example("BloodImage_00000")
    theirs = DeformableDetrImageProcessorPil(**options)(image, annotations=annotation, return_tensors="pt")
    compare(theirs, DeformableDetrImageProcessor(**options)(image, annotations=annotation, return_tensors="pt"))


def test_exif_orientation_is_honoured_unlike_transformers(tmp_path):
    """Deliberate difference: a JPEG whose EXIF says 'rotate 90' is processed as people see it."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = Image.open(tmp_path / "rotated.jpg")
    processor = DeformableDetrImageProcessor(size={"height": 100, "width": 60}, do_pad=False)
    assert DeformableDetrImageProcessor(do_pad=False)(loaded)["pixel_values"][0].shape[1:] == (1333, 800)
    assert DeformableDetrImageProcessorPil(do_pad=False)(loaded)["pixel_values"][0].shape[1:] == (800, 1333)
    assert processor(loaded)["pixel_values"][0].shape == (3, 100, 60)


def test_an_image_without_objects_is_valid():
    image, _ = bccd_example("BloodImage_00000")
    out = DeformableDetrImageProcessor()(image, annotations={"image_id": 7, "annotations": []}, return_tensors="pt")
    labels = out["labels"][0]
    assert labels["boxes"].shape == (0, 4) and labels["class_labels"].shape == (0,) and labels["image_id"].item() == 7


def test_older_configs_with_an_int_size_and_max_size_load_as_in_transformers(tmp_path):
    """The paper's checkpoints on the Hub have transformers' older processor config: `"size": 800, "max_size":
    1333`. It loads, and processes images, as transformers' processor does."""
    legacy = {"feature_extractor_type": "DeformableDetrFeatureExtractor", "format": "coco_detection", "size": 96}
    image, annotation = bccd_example("BloodImage_00000")
    for config in (legacy | {"max_size": 120}, legacy):
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
        theirs = DeformableDetrImageProcessorPil.from_pretrained(tmp_path)
        ours = DeformableDetrImageProcessor.from_pretrained(tmp_path)
        assert ours.size == {"shortest_edge": theirs.size.shortest_edge, "longest_edge": theirs.size.longest_edge}
        kwargs = dict(annotations=annotation, return_tensors="pt")
        compare(theirs(image, **kwargs), ours(image, **kwargs))
    assert DeformableDetrImageProcessor(size=500).size == {"shortest_edge": 500, "longest_edge": 1333}


def test_bad_annotations_and_options_are_named():
    image, _ = bccd_example("BloodImage_00000")
    processor = DeformableDetrImageProcessor()
    with pytest.raises(ValueError, match="image_id 3, object 0: needs an integer 'category_id' and a 4-number 'bbox'"):
        processor(image, annotations={"image_id": 3, "annotations": [{"bbox": [1, 2, 3], "category_id": 0}]})
    with pytest.raises(ValueError, match="got 1 images but 2 annotations"):
        processor([image], annotations=[{"annotations": []}] * 2)
    with pytest.raises(ValueError, match="size must have the keys"):
        DeformableDetrImageProcessor(size={"shortest_edge": 800})
    with pytest.raises(ValueError, match="size must be a dict with the keys .*, got '800'"):
        DeformableDetrImageProcessor(size="800")
    with pytest.raises(ValueError, match="image 0 has 5 channels"):
        processor(np.zeros((10, 10, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="image 0 is a str"):
        processor("not-an-image.jpg")


def test_mean_and_std_as_numpy_arrays_are_taken():
    processor = DeformableDetrImageProcessor(image_mean=np.array([0.5, 0.5, 0.5]), image_std=np.float32([1, 1, 1]))
    assert processor.image_mean == [0.5] * 3 and processor.image_std == [1.0] * 3


def test_annotations_and_images_of_the_wrong_shape_are_named():
    """Annotations of the wrong type or layout, no images, and an image without pixels are each named."""
    image, annotation = bccd_example("BloodImage_00000")
    processor = DeformableDetrImageProcessor()
    objects = annotation["annotations"]
    for images, annotations, message in (
        ([image, image], annotation, "annotations must be a list of one dict per image \\(2 images\\), got a dict"),
        ([image], annotation, "annotations must be a list of one dict per image"),
        ([image], objects[:1], "annotation 0 must be a COCO detection dict, .*got keys \\['area', 'bbox'"),
        (image, {"annotations": objects[0]}, "annotation 0 must be a COCO detection dict"),
        (image, {"annotations": [objects[0] | {"category_id": "cat"}]}, "object 0: needs an integer 'category_id'"),
        (image, {"annotations": [objects[0] | {"bbox": [1, 2, "3", 4]}]}, "object 0: needs .* 4-number 'bbox'"),
        ([], None, "no images given"),
        (Image.new("RGB", (0, 0)), None, "image 0 has no pixels"),
    ):
        with pytest.raises(ValueError, match=message):
            processor(images, annotations=annotations)


def test_post_processing_arguments_are_checked():
    from deformable_detr.model.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

    outputs = DeformableDetrObjectDetectionOutput(logits=torch.zeros(2, 5, 3), pred_boxes=torch.full((2, 5, 4), 0.5))
    processor = DeformableDetrImageProcessor()
    for kwargs, message in (
        ({"target_sizes": [(100, 200, 3)] * 2}, "target_sizes must be a positive \\(h, w\\) for each of the 2"),
        ({"target_sizes": (100, 200)}, "target_sizes must be a positive"),
        ({"target_sizes": [(100, 200), (0, 50)]}, "target_sizes must be a positive"),
        ({"top_k": -1}, "top_k must be a positive integer, got -1"),
        ({"threshold": None}, "threshold must be a number, got None"),
    ):
        with pytest.raises(ValueError, match=message):
            processor.post_process_object_detection(outputs, **kwargs)


def test_post_processing_same_as_transformers():
    from deformable_detr.model.modeling_deformable_detr import DeformableDetrObjectDetectionOutput

    g = torch.Generator().manual_seed(0)
    outputs = DeformableDetrObjectDetectionOutput(
        logits=torch.randn(2, 30, 4, generator=g) * 3, pred_boxes=torch.rand(2, 30, 4, generator=g) * 0.5 + 0.1
    )
    sizes = [(480, 640), (300, 200)]
    theirs = DeformableDetrImageProcessorPil().post_process_object_detection(
        outputs, threshold=0.3, target_sizes=sizes, top_k=50
    )
    ours = DeformableDetrImageProcessor().post_process_object_detection(
        outputs, threshold=0.3, target_sizes=sizes, top_k=50
    )
    for a, b in zip(theirs, ours, strict=True):
        assert len(b["scores"]) > 5
        assert torch.equal(a["labels"], b["labels"]) and torch.allclose(a["scores"], b["scores"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)


def test_save_and_load(tmp_path):
    processor = DeformableDetrImageProcessor(
        size={"shortest_edge": 480, "longest_edge": 640}, image_mean=[0.5, 0.5, 0.5]
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size"] == {"shortest_edge": 480, "longest_edge": 640}
    assert saved["auto_map"]["AutoImageProcessor"] == "image_processing_deformable_detr.DeformableDetrImageProcessor"
    assert (tmp_path / "image_processing_deformable_detr.py").exists()
    loaded = DeformableDetrImageProcessor.from_pretrained(tmp_path)
    image, _ = bccd_example("BloodImage_00000")
    assert torch.equal(
        processor(image, return_tensors="pt")["pixel_values"], loaded(image, return_tensors="pt")["pixel_values"]
    )


def test_boxes_relative_to_each_image_instead_of_the_canvas():
    """boxes_relative_to="image" (what training uses) gives every image's boxes relative to its own extent inside
    the padded canvas: the canvas-relative boxes scaled by canvas / image size; a bad value is named."""
    images, annotations = zip(*(bccd_example(name, i) for i, name in enumerate(BCCD_NAMES[:2])))
    images = [images[0], images[1].resize((320, 480))]  # portrait beside landscape: both get padded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BloodImage_00338's zero-area box
        canvas = DeformableDetrImageProcessor()(images, annotations=list(annotations), return_tensors="pt")
        own = DeformableDetrImageProcessor(boxes_relative_to="image")(
            images, annotations=list(annotations), return_tensors="pt"
        )
    for a, b, mask in zip(canvas["labels"], own["labels"], canvas["pixel_mask"], strict=True):
        height, width = mask.any(1).sum().item(), mask.any(0).sum().item()
        assert (height, width) != tuple(mask.shape)  # this image is padded
        scale = torch.tensor([mask.shape[1] / width, mask.shape[0] / height] * 2)
        assert torch.allclose(a["boxes"] * scale, b["boxes"], atol=1e-6) and b["boxes"].max() <= 1
    with pytest.raises(ValueError, match='boxes_relative_to must be "canvas" or "image", got \'pad\''):
        DeformableDetrImageProcessor(boxes_relative_to="pad")


def test_float_images_already_in_0_1_warn():
    """transformers warns the same way: rescaling an already rescaled image makes it nearly black."""
    image = np.random.default_rng(0).random((32, 48, 3), dtype=np.float32)
    with pytest.warns(UserWarning, match="image 0 is floating point with values in \\[0, 1\\]: it looks already"):
        DeformableDetrImageProcessor()(image)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DeformableDetrImageProcessor(do_rescale=False)(image)
        DeformableDetrImageProcessor()((image * 255).astype(np.uint8))


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_mean", [0.5, 0.5]),
        ("image_std", [0.2, 0.2, 0.2, 0.2]),
        ("image_std", [0.2, 0.0, 0.2]),
        ("image_mean", "0"),
    ],
)
def test_a_bad_mean_or_std_is_named(field, value):
    """A mean or std of the wrong length or type, or a zero std (infinite pixels), is named when the processor is
    made."""
    with pytest.raises(ValueError, match=f"^{field} must"):
        DeformableDetrImageProcessor(**{field: value})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"do_rescale": False},
        {"do_normalize": False},
        {"image_mean": [0.1, 0.7, 0.3], "image_std": [0.9, 0.05, 0.5], "rescale_factor": 1 / 127},
        {"do_convert_rgb": False, "image_mean": [0.5], "image_std": [0.25]},
        {"pad_size": {"height": 90, "width": 100}},
    ],
    ids=str,
)
def test_uint8_images_give_what_their_values_as_floats_give_bit_for_bit(options):
    """uint8 pixels are normalised by a lookup table of the float arithmetic: the same pixel_values as the
    same images as float32 arrays (which that arithmetic normalises), gray, RGB and RGBA, padded or not."""
    rng = np.random.default_rng(0)
    shapes = [(60, 90, 3), (75, 40, 3), (33, 33, 3)]
    if options.get("do_convert_rgb") is False:
        shapes = [(60, 90, 1), (75, 40, 4), (33, 33, 1)]
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in shapes]
    images[0][0, :, 0] = np.arange(90)  # among them every value from 0 to 255
    images[0][1, :, 0], images[0][2, :76, 0] = np.arange(90, 180), np.arange(180, 256)
    processor = DeformableDetrImageProcessor(do_resize=False, **options)
    for call in ({"return_tensors": "pt"} if len({s[-1] for s in shapes}) == 1 else {}, {"do_pad": False}):
        ours = processor(images, input_data_format="channels_last", **call)
        floats = processor([image.astype(np.float32) for image in images], input_data_format="channels_last", **call)
        assert len(ours["pixel_values"]) == 3
        for a, b in zip(ours["pixel_values"], floats["pixel_values"], strict=True):
            assert a.dtype == b.dtype and np.asarray(a).dtype == np.float32
            assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(ours["pixel_values"][0]), np.asarray(ours["pixel_values"][1])[:1])
