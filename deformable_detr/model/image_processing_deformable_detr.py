"""The image processor: images (+ COCO annotations) -> pixel_values, pixel_mask (+ labels); model outputs ->
detections in pixels of the original images.

Shapes: B images, H x W the padded canvas, T objects in one image, Q queries, N classes.
"""

import dataclasses
import numbers
import os
import pathlib
import warnings

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    AnnotationFormat,
    SizeDict,
    get_image_size_for_max_height_width,
)
from transformers.processing_utils import ImagesKwargs

from .box_ops import box_cxcywh_to_xyxy, box_xywh_to_xyxy, box_xyxy_to_cxcywh, coco_area

SIZE_KINDS = ({"shortest_edge", "longest_edge"}, {"max_height", "max_width"}, {"height", "width"})
SUPPORTED_FORMATS = (AnnotationFormat.COCO_DETECTION, AnnotationFormat.COCO_PANOPTIC)
# the processor's options, each settable when creating it and for one call
OPTIONS = (
    "do_convert_rgb",
    "do_resize",
    "size",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_pad",
    "pad_size",
    "do_convert_annotations",
    "format",
    "boxes_relative_to",
)
CALL_ONLY = ("return_tensors", "data_format", "input_data_format")
# transformers' processors all take these; its Deformable DETR one ignores them (`device` and `disable_grouping`
# steer its torchvision processor), and so does this one
IGNORED = ("device", "disable_grouping", "default_to_square", "crop_size", "do_center_crop", "image_seq_length")


def to_rgb_image(image: Image.Image) -> Image.Image:
    """A PIL image as people see it, in RGB: JPEG EXIF orientation applied, 16-bit gray scaled to 8 bits (PIL's
    own conversion would clip it to white), transparency composited onto white (as transformers does). The one
    rule for the processor, the training data and the detect command. An RGB image that needs none of that comes
    back as it is (decoded), not copied."""
    image.load()  # decoding errors are raised here, where callers expect them
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit PNGs open as I;16 (or I): scale 0..65535 to 0..255
        values = np.asarray(image).astype(np.float64)
        if image.mode != "I" or values.max() > 255:
            values = values / 257
        image = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def check_layout(name: str, value) -> None:
    """data_format or input_data_format: None, "channels_first" or "channels_last"; ValueError naming it."""
    if value not in (None, "channels_first", "channels_last"):
        raise ValueError(f'{name} must be "channels_first" or "channels_last", got {value!r}')


def to_channels_last(image, index: int = 0, input_data_format=None) -> np.ndarray:
    """A PIL image (EXIF orientation applied), numpy array or torch tensor -> (h, w, c) array of the values as given,
    c in 1, 3, 4. `input_data_format` ("channels_first" or "channels_last") says where the channels of an array are
    (PIL images have them last); None infers it (first when the first axis has 1, 3 or 4 entries, the last not)."""
    check_layout("input_data_format", input_data_format)
    if isinstance(image, Image.Image):
        image, input_data_format = np.asarray(ImageOps.exif_transpose(image)), "channels_last"
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index} is a {type(image).__name__}; give PIL images, numpy arrays or torch tensors")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image {index} has shape {image.shape}; expected (h, w), (h, w, c) or (c, h, w)")
    if input_data_format is None:
        channels_first = image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4)
    else:
        channels_first = input_data_format == "channels_first"
    if channels_first:
        image = image.transpose(1, 2, 0)
    if image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image {index} has {image.shape[-1]} channels (shape {image.shape}); expected 1, 3 or 4")
    return image


def to_rgb_array(image, index: int = 0, input_data_format=None) -> np.ndarray:
    """A PIL image, numpy array or torch tensor (channels first or last; gray, RGB or RGBA) -> (h, w, 3) array
    (uint8 stays uint8; uint16 is scaled to 0..255, bool to 0 and 255, other integers must be in 0..255). PIL
    images go through `to_rgb_image`; `input_data_format` as in `to_channels_last`."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb_image(image))
    image = to_channels_last(image, index, input_data_format)
    channels = image.shape[-1]
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype == np.uint16:  # 16 bits, as PIL's I;16: 0..65535 -> 0..255
        image = image.astype(np.float32) / 257.0
    elif np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8:
        if image.size and (image.min() < 0 or image.max() > 255):
            raise ValueError(
                f"image {index} is {image.dtype} with values from {image.min()} to {image.max()}; give uint8 "
                "(0..255), uint16 (0..65535) or floating-point images"
            )
        image = image.astype(np.uint8)
    if channels == 4:  # transparency onto white
        white = 1.0 if image.dtype != np.uint8 and image.size and image.max() <= 1 else 255.0
        alpha = image[..., 3:].astype(np.float32) / white
        rgb = image[..., :3] * alpha + white * (1 - alpha)
        image = rgb.round().astype(np.uint8) if image.dtype == np.uint8 else rgb
    if channels == 1:
        image = np.repeat(image, 3, axis=-1)
    return image


def resize_array(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """(h, w, c) -> (height, width, c) by PIL resampling: uint8 gray, RGB and RGBA directly, anything else one
    channel at a time in mode F (float32)."""
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3, 4):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        return np.asarray(pil.resize((width, height), resample=resample)).reshape(height, width, -1)
    channels = [
        Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((width, height), resample=resample)
        for c in range(image.shape[-1])
    ]
    return np.stack([np.asarray(c) for c in channels], -1)


def check_statistics(options: dict, channels: int) -> None:
    """image_mean and image_std hold one value, or one per channel, where the options normalise; ValueError."""
    for name in ("image_mean", "image_std"):
        if options["do_normalize"] and len(options[name]) not in (1, channels):
            raise ValueError(f"{name} has {len(options[name])} values for images of {channels} channels")


def rescaled_and_normalized(array: np.ndarray, options: dict) -> np.ndarray:
    """(C, H, W) -> float32, rescaled by `rescale_factor` (in float64, as transformers) and normalised by
    `image_mean` and `image_std` where the options say so (`check_statistics` first)."""
    array = array.astype(np.float32)
    if options["do_rescale"]:
        array = (array.astype(np.float64) * options["rescale_factor"]).astype(np.float32)
    if options["do_normalize"]:
        mean, std = (np.asarray(options[k], dtype=np.float32)[:, None, None] for k in ("image_mean", "image_std"))
        array = (array - mean) / std
    return array


def normalize_into(array: np.ndarray, options: dict, out: np.ndarray) -> None:
    """`rescaled_and_normalized(array, options)` written into `out` (C, H, W) float32. A uint8 image has 256 values
    a channel: it looks them up in a (C, 256) table made by that arithmetic, so the result is the same, bit for
    bit, at a fraction of the cost."""
    if array.dtype != np.uint8:
        out[...] = rescaled_and_normalized(array, options)
        return
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (len(array), 1, 256))
    table = rescaled_and_normalized(levels, options)[:, 0]
    for channel, values in enumerate(array):
        np.take(table[channel], values, out=out[channel], mode="clip")  # uint8 indices are all in range


def category_id(value) -> int | None:
    """A class id from an int, a whole-number float (0.0, as albumentations gives them) or a numpy scalar; None
    for anything else."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return None


def segmentation_masks(segmentations: list, height: int, width: int, image_id) -> np.ndarray:
    """COCO segmentations (per object: polygons `[[x0, y0, x1, y1, ...], ...]`, an RLE `{"counts", "size"}`
    compressed or not) -> (T, height, width) bool masks, decoded with pycocotools."""
    try:
        from pycocotools import mask as coco_mask
    except ImportError as error:
        raise ImportError(
            "return_segmentation_masks=True needs pycocotools to decode COCO polygons and RLE: pip install pycocotools"
        ) from error
    masks = np.zeros((len(segmentations), height, width), dtype=bool)
    for j, segmentation in enumerate(segmentations):
        compressed = isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes))
        decoded = coco_mask.decode(segmentation if compressed else coco_mask.frPyObjects(segmentation, height, width))
        if decoded.shape[:2] != (height, width):
            raise ValueError(
                f"image_id {image_id}, object {j}: its segmentation is {decoded.shape[0]}x{decoded.shape[1]}, "
                f"the image {height}x{width}"
            )
        masks[j] = decoded.reshape(height, width, -1).any(-1)
    return masks


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(T, H, W) bool masks, none empty -> (T, 4) float32 x0, y0, x1, y1 of their first and last pixel rows and
    columns (the last ones included, as DETR's masks_to_boxes gives them)."""
    rows, columns = masks.any(2), masks.any(1)
    height, width = masks.shape[1:]
    boxes = [
        columns.argmax(1),
        rows.argmax(1),
        width - 1 - columns[:, ::-1].argmax(1),
        height - 1 - rows[:, ::-1].argmax(1),
    ]
    return np.stack(boxes, 1).astype(np.float32).reshape(-1, 4)


def detection_target(annotation, image_size, index: int, with_masks: bool) -> tuple[dict, int]:
    """A COCO detection dict -> arrays with xyxy boxes in pixels, clipped to the image, and how many boxes were
    dropped for having no area inside it. Crowd regions are left out, as in DETR. With `with_masks`, the objects'
    segmentations as (T, H, W) bool `masks`; `keypoints` (T * K, 3) pass through as given, as in transformers."""
    height, width = image_size
    if not isinstance(annotation, dict) or not isinstance(annotation.get("annotations"), (list, tuple)):
        got = f"keys {sorted(annotation)}" if isinstance(annotation, dict) else type(annotation).__name__
        raise ValueError(
            f"annotation {index} must be a COCO detection dict, {{'image_id', 'annotations': [one dict per "
            f"object]}}, got {got}"
        )
    image_id = annotation.get("image_id", index)
    objects = [o for o in annotation["annotations"] if not (isinstance(o, dict) and o.get("iscrowd", 0))]
    for j, o in enumerate(objects):
        if not (
            isinstance(o, dict)
            and category_id(o.get("category_id")) is not None
            and isinstance(o.get("bbox"), (list, tuple, np.ndarray))
            and len(o["bbox"]) == 4
            and all(isinstance(v, (int, float, np.number)) for v in o["bbox"])
        ):
            raise ValueError(
                f"image_id {image_id}, object {j}: needs an integer 'category_id' and a 4-number 'bbox' "
                f"[x, y, w, h], got {o}"
            )
        if with_masks and "segmentation" not in o:
            raise ValueError(
                f"image_id {image_id}, object {j}: return_segmentation_masks needs its 'segmentation' (polygons or "
                f"RLE), got keys {sorted(o)}"
            )
    boxes = np.asarray([o["bbox"] for o in objects], dtype=np.float32).reshape(-1, 4)
    boxes = box_xywh_to_xyxy(torch.from_numpy(boxes)).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    area = np.asarray([coco_area(o["bbox"], o.get("area")) for o in objects], dtype=np.float32)
    target = {
        "image_id": np.asarray([image_id], dtype=np.int64),
        "class_labels": np.asarray([category_id(o["category_id"]) for o in objects], dtype=np.int64)[keep],
        "boxes": boxes[keep],
        "area": area[keep],
        "iscrowd": np.zeros(int(keep.sum()), dtype=np.int64),
        "orig_size": np.asarray([height, width], dtype=np.int64),
    }
    if objects and "keypoints" in objects[0]:
        keypoints = np.asarray([o["keypoints"] for o in objects], dtype=np.float32)[keep]
        target["keypoints"] = keypoints.reshape(-1, 3) if len(keypoints) else keypoints
    if with_masks:
        masks = segmentation_masks([o["segmentation"] for o in objects], height, width, image_id)
        target["masks"] = masks[keep]
    return target, int((~keep).sum())


def panoptic_target(annotation, image_size, index: int, with_masks: bool, masks_path) -> dict:
    """A COCO panoptic dict and its PNG (segment id = R + 256 G + 256² B) -> arrays: per segment its class, its
    mask's xyxy box in pixels, area and iscrowd as given (area defaults to the mask's pixel count), and with
    `with_masks` the (T, H, W) bool `masks`."""
    height, width = image_size
    if not (
        isinstance(annotation, dict)
        and isinstance(annotation.get("file_name"), str)
        and isinstance(annotation.get("segments_info"), (list, tuple))
    ):
        got = f"keys {sorted(annotation)}" if isinstance(annotation, dict) else type(annotation).__name__
        raise ValueError(
            f"annotation {index} must be a COCO panoptic dict, {{'image_id', 'file_name', 'segments_info': [one "
            f"dict per segment]}}, got {got}"
        )
    image_id = annotation.get("image_id", annotation.get("id", index))
    segments = annotation["segments_info"]
    for j, segment in enumerate(segments):
        if not (isinstance(segment, dict) and "id" in segment and category_id(segment.get("category_id")) is not None):
            raise ValueError(
                f"image_id {image_id}, segment {j}: needs an 'id' and an integer 'category_id', got {segment}"
            )
    path = pathlib.Path(masks_path) / annotation["file_name"]
    png = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    if png.shape[:2] != (height, width):
        raise ValueError(f"{path} is {png.shape[0]}x{png.shape[1]}, its image {height}x{width} (image_id {image_id})")
    ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
    masks = ids[None] == np.asarray([s["id"] for s in segments], dtype=np.int64).reshape(-1, 1, 1)
    missing = [s["id"] for s, m in zip(segments, masks) if not m.any()]
    if missing:
        raise ValueError(f"image_id {image_id}: segment id(s) {missing} of its segments_info are not in {path}")
    target = {
        "image_id": np.asarray([image_id], dtype=np.int64),
        "class_labels": np.asarray([category_id(s["category_id"]) for s in segments], dtype=np.int64),
        "boxes": mask_boxes(masks),
        "area": np.asarray([s.get("area", m.sum()) for s, m in zip(segments, masks)], dtype=np.float32),
        "iscrowd": np.asarray([s.get("iscrowd", 0) for s in segments], dtype=np.int64),
        "orig_size": np.asarray([height, width], dtype=np.int64),
    }
    if with_masks:
        target["masks"] = masks
    return target


class DeformableDetrImageProcessorKwargs(ImagesKwargs, total=False):
    """The keywords transformers' Deformable DETR processor takes, and ours: `format` ("coco_detection" or
    "coco_panoptic"), `do_convert_annotations`, `boxes_relative_to`."""

    format: str
    do_convert_annotations: bool
    boxes_relative_to: str


class DeformableDetrImageProcessor(BaseImageProcessor):
    r"""Resize (shortest edge 800, longest 1333 by default), rescale, normalise (ImageNet mean and std), pad
    bottom-right to the batch's largest image (or `pad_size`), and a `pixel_mask` with 1 on real pixels. Every
    option can also be given to one call (`processor(images, size=..., do_pad=False)`), as in transformers.

    Args:
        size: `{"shortest_edge", "longest_edge"}`, `{"max_height", "max_width"}` (keep aspect ratio) or
            `{"height", "width"}` (exact); an int is the shortest edge, with `max_size` (default 1333) the longest,
            as in transformers' older configs (the paper's checkpoints on the Hub have them).
        pad_size: `{"height", "width"}` of a fixed canvas; None pads to the largest image of each batch.
        do_convert_rgb: None or True: every image as RGB (gray repeated, transparency onto white, 16-bit scaled);
            False: the channels as given (1, 3 or 4; image_mean and image_std then need one value per channel).
        do_convert_annotations: give label boxes as normalised (cx, cy, w, h); None: when `do_normalize`.
        format: the annotations' format, "coco_detection" (`{"image_id", "annotations": [...]}`) or
            "coco_panoptic" (`{"image_id", "file_name", "segments_info": [...]}` with PNGs under `masks_path`).
        boxes_relative_to: what those are relative to: "canvas", the padded canvas (as transformers), or "image",
            each image's own extent inside it (as the model predicts them and the loss compares them; the
            training collator uses this).
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = DeformableDetrImageProcessorKwargs

    def __init__(
        self,
        do_resize=True,
        size=None,
        resample=Image.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=None,
        image_std=None,
        do_pad=None,
        pad_size=None,
        do_convert_annotations=None,
        format="coco_detection",
        do_convert_rgb=None,
        boxes_relative_to="canvas",
        **kwargs,
    ):
        # transformers' older configs: max_size goes with an int size, pad_and_return_pixel_mask is do_pad
        max_size = kwargs.pop("max_size", None)
        legacy_pad = kwargs.pop("pad_and_return_pixel_mask", True)
        super().__init__(**kwargs)
        if isinstance(size, int) and not isinstance(size, bool) and max_size is not None:
            size = {"shortest_edge": size, "longest_edge": max_size}
        settings = {
            "do_resize": do_resize,
            "size": size if size is not None else {"shortest_edge": 800, "longest_edge": 1333},
            "resample": resample,
            "do_rescale": do_rescale,
            "rescale_factor": rescale_factor,
            "do_normalize": do_normalize,
            "image_mean": image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN,
            "image_std": image_std if image_std is not None else IMAGENET_DEFAULT_STD,
            "do_pad": legacy_pad if do_pad is None else do_pad,
            "pad_size": pad_size,
            # as in transformers: unless told, boxes are normalised when pixels are
            "do_convert_annotations": do_normalize if do_convert_annotations is None else do_convert_annotations,
            "format": format,
            "do_convert_rgb": do_convert_rgb,
            "boxes_relative_to": boxes_relative_to,
        }
        for name, value in settings.items():
            setattr(self, name, self._checked(name, value))
        if self.do_convert_rgb is not False:
            for name in ("image_mean", "image_std"):
                if len(getattr(self, name)) != 3:
                    raise ValueError(
                        f"{name} must be three finite numbers, one per channel (R, G, B), got {getattr(self, name)}"
                    )

    @staticmethod
    def _check_channels(values, name) -> list[float]:
        """image_mean or image_std: one finite number (for every channel) or one per channel -> a list; ValueError
        naming `name`."""
        if isinstance(values, numbers.Real) and not isinstance(values, bool):
            values = [values] * 3
        if (
            not isinstance(values, (list, tuple, np.ndarray))
            or len(values) not in (1, 3, 4)
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in values)
        ):
            raise ValueError(
                f"{name} must be finite numbers, one for every channel or one per channel (1, 3 or 4 of them), "
                f"got {values!r}"
            )
        if name == "image_std" and 0 in values:
            raise ValueError(f"image_std must not hold 0 (it divides the pixels), got {list(values)}")
        return [float(v) for v in values]

    @staticmethod
    def _check_size(size, name, kinds=SIZE_KINDS) -> dict:
        keys = " or ".join(str(sorted(k)) for k in kinds)
        if isinstance(size, SizeDict):
            size = dataclasses.asdict(size)
        if not isinstance(size, dict):
            raise ValueError(f"{name} must be a dict with the keys {keys}, got {size!r}")
        size = {k: v for k, v in size.items() if v is not None}
        if set(size) not in kinds:
            raise ValueError(f"{name} must have the keys {keys}, got {sorted(size)}")
        if any(not isinstance(v, int) or v < 1 for v in size.values()):
            raise ValueError(f"{name} values must be positive integers, got {size}")
        return size

    @classmethod
    def _checked(cls, name: str, value):
        """One option, checked and in the form the processor keeps it; ValueError naming it."""
        if name == "size":
            if isinstance(value, int) and not isinstance(value, bool):  # an int: the shortest edge, at most 1333
                value = {"shortest_edge": value, "longest_edge": 1333}
            return cls._check_size(value, "size")
        if name == "pad_size":
            return None if value is None else cls._check_size(value, "pad_size", ({"height", "width"},))
        if name in ("image_mean", "image_std"):
            return cls._check_channels(value, name)
        if name == "format":
            formats = [f.value for f in SUPPORTED_FORMATS]
            if value not in formats:
                raise ValueError(f"format must be one of {formats}, got {value!r}")
            return AnnotationFormat(value).value
        if name == "boxes_relative_to" and value not in ("canvas", "image"):
            raise ValueError(f'boxes_relative_to must be "canvas" or "image", got {value!r}')
        if name == "resample" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5):
            raise ValueError(f"resample must be one of PIL's resampling filters (0..5), got {value!r}")
        if name == "rescale_factor" and not (
            isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) and value > 0
        ):
            raise ValueError(f"rescale_factor must be a positive number, got {value!r}")
        flag = name.startswith("do_") and not (name == "do_convert_rgb" and value is None)
        if flag and not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return int(value) if name == "resample" else value

    def _call_options(self, kwargs: dict) -> dict:
        """This processor's options, with those of one call (None keeps the processor's) put in."""
        unknown = set(kwargs) - set(OPTIONS) - set(CALL_ONLY) - set(IGNORED)
        if unknown:
            raise TypeError(f"unknown argument(s) {sorted(unknown)}; the processor takes {sorted(OPTIONS + CALL_ONLY)}")
        if kwargs.get("do_center_crop"):
            raise ValueError("do_center_crop=True: Deformable DETR's processor does not center-crop")
        options = {name: getattr(self, name) for name in OPTIONS}
        options.update({k: self._checked(k, v) for k, v in kwargs.items() if k in OPTIONS and v is not None})
        options.update({k: kwargs.get(k) for k in CALL_ONLY})
        check_layout("data_format", options["data_format"])
        check_layout("input_data_format", options["input_data_format"])
        return options

    def output_size(self, height: int, width: int, size: dict | None = None) -> tuple[int, int]:
        """(h, w) of an image after resizing to `size` (default: the processor's)."""
        size = self.size if size is None else self._check_size(size, "size")
        if "shortest_edge" in size:
            return get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
        if "max_height" in size:
            return get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"])
        return size["height"], size["width"]

    def resize(self, image: np.ndarray, size, resample=None, **kwargs) -> np.ndarray:
        """(C, H, W) image -> (C, h, w) resized to `size` (any of the `size` forms), by `resample` (default the
        processor's); uint8 stays uint8, anything else comes back float32."""
        height, width = self.output_size(*image.shape[1:], size)
        resample = self.resample if resample is None else self._checked("resample", resample)
        return resize_array(image.transpose(1, 2, 0), height, width, resample).transpose(2, 0, 1)

    def resize_annotation(
        self, annotation: dict, orig_size, target_size, threshold: float = 0.5, resample=Image.NEAREST
    ) -> dict:
        """A prepared annotation (boxes in pixels) for an image resized from `orig_size` to `target_size` (h, w):
        boxes and area scaled, masks resized by `resample` and kept where above `threshold`, `size` the new size."""
        ratio_h, ratio_w = (float(new) / float(old) for new, old in zip(target_size, orig_size))
        resized = dict(annotation, size=np.asarray(target_size, dtype=np.int64))
        if "boxes" in annotation:
            resized["boxes"] = annotation["boxes"] * np.asarray([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)
        if "area" in annotation:
            resized["area"] = annotation["area"] * (ratio_w * ratio_h)
        if "masks" in annotation:
            masks = annotation["masks"].astype(np.float32).transpose(1, 2, 0)
            resized["masks"] = resize_array(masks, *target_size, resample).reshape(*target_size, -1).transpose(2, 0, 1)
            resized["masks"] = resized["masks"] > threshold
        return resized

    def normalize_annotation(self, annotation: dict, image_size) -> dict:
        """Boxes x0, y0, x1, y1 in pixels -> cx, cy, w, h relative to `image_size` (h, w)."""
        normalized = dict(annotation)
        if "boxes" in annotation:
            height, width = image_size
            centers = box_xyxy_to_cxcywh(torch.from_numpy(np.asarray(annotation["boxes"], np.float32))).numpy()
            normalized["boxes"] = centers / np.asarray([width, height, width, height], dtype=np.float32)
        return normalized

    def pad(self, image: np.ndarray, padded_size, annotation: dict | None = None, update_bboxes=True, fill=0):
        """(C, h, w) image -> (C, H, W) with `fill` right and below, its (H, W) int64 pixel mask (1 on the image),
        and the annotation for it: masks padded with False, `size` (H, W) and, with `update_bboxes`, normalised
        boxes made relative to the padded canvas."""
        channels, height, width = image.shape
        canvas_h, canvas_w = padded_size
        if height > canvas_h or width > canvas_w:
            raise ValueError(f"the image is {height}x{width}, larger than the padded size {canvas_h}x{canvas_w}")
        padded = np.full((channels, canvas_h, canvas_w), fill, dtype=image.dtype)
        padded[:, :height, :width] = image
        pixel_mask = np.zeros((canvas_h, canvas_w), dtype=np.int64)
        pixel_mask[:height, :width] = 1
        if annotation is not None:
            annotation = self._padded_annotation(annotation, (height, width), padded_size, update_bboxes)
        return padded, pixel_mask, annotation

    @staticmethod
    def _padded_annotation(annotation: dict, image_size, padded_size, update_bboxes: bool) -> dict:
        """The annotation of an image of `image_size` (h, w) padded to `padded_size` (H, W): `size` (H, W), masks
        padded with False and, with `update_bboxes`, normalised boxes made relative to the canvas."""
        (height, width), (canvas_h, canvas_w) = image_size, padded_size
        annotation = dict(annotation, size=np.asarray((canvas_h, canvas_w), dtype=np.int64))
        if "masks" in annotation:
            masks = np.zeros((len(annotation["masks"]), canvas_h, canvas_w), dtype=bool)
            masks[:, :height, :width] = annotation["masks"]
            annotation["masks"] = masks
        if update_bboxes and "boxes" in annotation:
            scale = np.asarray([width / canvas_w, height / canvas_h] * 2, dtype=np.float32)
            annotation["boxes"] = annotation["boxes"] * scale
        return annotation

    def preprocess(
        self, images, annotations=None, return_segmentation_masks=None, masks_path=None, **kwargs
    ) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy or torch; channels first or last; gray, RGB or RGBA).
            annotations: one dict per image: COCO detection, `{"image_id", "annotations": [{"bbox": [x, y, w, h],
                "category_id", "area", "iscrowd", "segmentation"}]}`, or with `format="coco_panoptic"` COCO
                panoptic, `{"image_id", "file_name", "segments_info": [{"id", "category_id", "area", "iscrowd"}]}`.
            return_segmentation_masks: add `masks` to the labels (default: for panoptic annotations only).
            masks_path: the folder of the panoptic PNGs (`file_name` in it).
            kwargs: any of the processor's options for this call, and `return_tensors` ("pt", "np" or None),
                `data_format` (of pixel_values: "channels_first", the default, or "channels_last"),
                `input_data_format` (of the arrays given: None infers it).
        Returns:
            `pixel_values` (B, 3, H, W) float32, `pixel_mask` (B, H, W) int64, and with annotations `labels`:
            per image `class_labels` (T,), `boxes` (T, 4), `area` (T,), `iscrowd` (T,), `image_id` (1,),
            `orig_size` and `size` (2,) as (h, w), and with masks `masks` (T, H, W) bool.
        """
        options = self._call_options(kwargs)
        images, annotations = self._batch(images, annotations)
        with_masks = (
            options["format"] == "coco_panoptic" if return_segmentation_masks is None else return_segmentation_masks
        )
        if (
            annotations is not None
            and options["format"] == "coco_panoptic"
            and not isinstance(masks_path, (str, os.PathLike))
        ):
            raise ValueError(f"coco_panoptic annotations need masks_path, the folder of their PNGs; got {masks_path!r}")
        arrays, targets, dropped = [], [], {}
        for index, image in enumerate(images):
            array = self._image_array(image, index, options)
            target = None
            if annotations is not None:
                target, dropped[index] = self._prepare_annotation(
                    annotations[index], array.shape[1:], index, options["format"], with_masks, masks_path
                )
            array, target = self._transform(array, target, options)
            arrays.append(array)
            targets.append(target)
        if sum(dropped.values()):
            where = ", ".join(f"image_id {targets[i]['image_id'][0]}: {n}" for i, n in dropped.items() if n)
            warnings.warn(
                f"dropped {sum(dropped.values())} box(es) with no area inside their image ({where})", stacklevel=2
            )
        data = {}
        if options["do_pad"]:
            arrays, data["pixel_mask"], targets = self._pad_batch(arrays, targets, options)
            if options["return_tensors"] is None:  # a list of images, as without padding
                arrays, data["pixel_mask"] = list(arrays), list(data["pixel_mask"])
        else:
            arrays = [rescaled_and_normalized(array, options) for array in arrays]
        if options["data_format"] == "channels_last":
            arrays = [array.transpose(1, 2, 0) for array in arrays]
        data["pixel_values"] = arrays
        encoded = BatchFeature(data, tensor_type=options["return_tensors"])
        if annotations is not None:
            encoded["labels"] = [BatchFeature(t, tensor_type=options["return_tensors"]) for t in targets]
        return encoded

    @staticmethod
    def _batch(images, annotations) -> tuple[list, list | None]:
        """One image or a list, one annotation or a list -> lists of the same length; ValueError otherwise."""
        if not isinstance(images, (list, tuple)):
            images = [images]
            annotations = [annotations] if isinstance(annotations, dict) else annotations
        if not images:
            raise ValueError("no images given")
        if annotations is not None and not isinstance(annotations, (list, tuple)):
            raise ValueError(
                f"annotations must be a list of one dict per image ({len(images)} images), got a "
                f"{type(annotations).__name__}"
            )
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(f"got {len(images)} images but {len(annotations)} annotations")
        return list(images), annotations

    def _image_array(self, image, index: int, options: dict) -> np.ndarray:
        """One input image -> (C, H, W) array: RGB unless do_convert_rgb is False; a warning when it looks
        rescaled already."""
        if options["do_convert_rgb"] is False:
            array = to_channels_last(image, index, options["input_data_format"])
        else:
            array = to_rgb_array(image, index, options["input_data_format"])
        if 0 in array.shape[:2]:
            raise ValueError(f"image {index} has no pixels ({array.shape[1]}x{array.shape[0]})")
        if options["do_rescale"] and np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1:
            warnings.warn(
                f"image {index} is floating point with values in [0, 1]: it looks already rescaled, and "
                f"rescaling it by {options['rescale_factor']:g} again leaves it nearly black; pass uint8 images or "
                "create the processor with do_rescale=False",
                stacklevel=3,
            )
        return array.transpose(2, 0, 1)

    def _transform(self, array: np.ndarray, target: dict | None, options: dict) -> tuple[np.ndarray, dict | None]:
        """Resize one (C, H, W) image (uint8 stays uint8) and its annotation: `size` and, with
        do_convert_annotations, normalised boxes."""
        check_statistics(options, len(array))
        if options["do_resize"]:
            resized = self.resize(array, options["size"], options["resample"])
            if target is not None:
                target = self.resize_annotation(target, array.shape[1:], resized.shape[1:])
            array = resized
        if target is not None:
            target["size"] = np.asarray(array.shape[1:], dtype=np.int64)
            if options["do_convert_annotations"]:
                target = self.normalize_annotation(target, array.shape[1:])
        return array, target

    def _pad_batch(self, arrays: list, targets: list, options: dict) -> tuple[np.ndarray | list, np.ndarray, list]:
        """Every image normalised onto a zero canvas of `pad_size` or the batch's largest image: (B, C, H, W)
        float32 (a list of (C_i, H, W) where the images' channel counts differ), the (B, H, W) int64 pixel masks,
        and the annotations for it (as `pad` gives them)."""
        pad_size = options["pad_size"]
        canvas = (
            (pad_size["height"], pad_size["width"]) if pad_size else tuple(np.max([a.shape[1:] for a in arrays], 0))
        )
        # transformers gives normalised boxes relative to the canvas; "image" keeps them relative to the image
        update_bboxes = options["do_convert_annotations"] and options["boxes_relative_to"] == "canvas"
        channels = {len(array) for array in arrays}
        if len(channels) == 1:
            pixels = np.zeros((len(arrays), *channels, *canvas), dtype=np.float32)
        else:  # do_convert_rgb=False with images of several channel counts: one canvas each
            pixels = [np.zeros((len(array), *canvas), dtype=np.float32) for array in arrays]
        masks = np.zeros((len(arrays), *canvas), dtype=np.int64)
        for index, (array, target) in enumerate(zip(arrays, targets)):
            height, width = array.shape[1:]
            if height > canvas[0] or width > canvas[1]:
                raise ValueError(
                    f"image {index} is {height}x{width} after resizing, larger than pad_size {canvas[0]}x{canvas[1]}"
                )
            normalize_into(array, options, pixels[index][:, :height, :width])
            masks[index, :height, :width] = 1
            if target is not None:
                targets[index] = self._padded_annotation(target, (height, width), canvas, update_bboxes)
        return pixels, masks, targets

    def _prepare_annotation(self, annotation, image_size, index, format, with_masks, masks_path) -> tuple[dict, int]:
        """A COCO annotation -> arrays with xyxy boxes in pixels, and how many boxes were dropped."""
        if format == "coco_panoptic":
            return panoptic_target(annotation, image_size, index, with_masks, masks_path), 0
        return detection_target(annotation, image_size, index, with_masks)

    def post_process_object_detection(self, outputs, threshold: float = 0.5, target_sizes=None, top_k: int = 100):
        """The top_k (query, class) pairs by sigmoid score, above `threshold`, as absolute xyxy boxes.

        Args:
            outputs: the model's output (`logits` (B, Q, N), `pred_boxes` (B, Q, 4)).
            target_sizes: (B, 2) tensor or list of (h, w) of the original images; None keeps boxes in [0, 1].
        Returns:
            per image {"scores" (k,), "labels" (k,), "boxes" (k, 4) x0, y0, x1, y1}.
        """
        logits, boxes = outputs.logits, outputs.pred_boxes
        B, Q, N = logits.shape
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        if target_sizes is not None:
            sizes = torch.as_tensor(target_sizes, dtype=boxes.dtype, device=boxes.device)
            if sizes.shape != (B, 2) or not (sizes > 0).all():
                raise ValueError(
                    f"target_sizes must be a positive (h, w) for each of the {B} images, got {sizes.tolist()}"
                )
        scores, indices = logits.sigmoid().view(B, -1).topk(min(top_k, Q * N), dim=1)
        labels = indices % N
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes), 1, (indices // N)[..., None].expand(-1, -1, 4))
        if target_sizes is not None:
            boxes = boxes * torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], 1)[:, None]
        keep = scores > threshold
        return [
            {"scores": s[k], "labels": image_labels[k], "boxes": b[k]}
            for s, image_labels, b, k in zip(scores, labels, boxes, keep)
        ]
