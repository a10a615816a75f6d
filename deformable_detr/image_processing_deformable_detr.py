"""The image processor: images (+ COCO annotations) -> pixel_values, pixel_mask (+ labels); model outputs ->
detections in pixels of the original images.

Shapes: B images, H x W the padded canvas, T objects in one image, Q queries, N classes.
"""

import numbers
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, get_image_size_for_max_height_width

from .box_ops import box_cxcywh_to_xyxy, box_xywh_to_xyxy, box_xyxy_to_cxcywh

SIZE_KINDS = ({"shortest_edge", "longest_edge"}, {"max_height", "max_width"}, {"height", "width"})


def to_rgb_image(image: Image.Image) -> Image.Image:
    """A PIL image as people see it, in RGB: JPEG EXIF orientation applied, 16-bit gray scaled to 8 bits (PIL's
    own conversion would clip it to white), transparency composited onto white (as transformers does). The one
    rule for the processor, the training data and the detect command."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):  # 16-bit PNGs open as I;16 (or I): scale 0..65535 to 0..255
        values = np.asarray(image).astype(np.float64)
        if image.mode != "I" or values.max() > 255:
            values = values / 257
        image = Image.fromarray(values.round().clip(0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def to_rgb_array(image, index: int = 0) -> np.ndarray:
    """A PIL image, numpy array or torch tensor (channels first or last; gray, RGB or RGBA) -> (h, w, 3) array
    (uint8 stays uint8; uint16 is scaled to 0..255, bool to 0 and 255, other integers must be in 0..255). PIL
    images go through `to_rgb_image`."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb_image(image))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image {index} is a {type(image).__name__}; give PIL images, numpy arrays or torch tensors")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"image {index} has shape {image.shape}; expected (h, w), (h, w, c) or (c, h, w)")
    if image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)
    channels = image.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"image {index} has {channels} channels (shape {image.shape}); expected 1, 3 or 4")
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
    """PIL resampling, on uint8 directly or on each float channel in mode F."""
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))
    channels = [
        Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((width, height), resample=resample)
        for c in range(3)
    ]
    return np.stack([np.asarray(c) for c in channels], -1)


class DeformableDetrImageProcessor(BaseImageProcessor):
    r"""Resize (shortest edge 800, longest 1333 by default), rescale, normalise (ImageNet mean and std), pad
    bottom-right to the batch's largest image (or `pad_size`), and a `pixel_mask` with 1 on real pixels.

    Args:
        size: `{"shortest_edge", "longest_edge"}`, `{"max_height", "max_width"}` (keep aspect ratio) or
            `{"height", "width"}` (exact); an int is the shortest edge, with `max_size` (default 1333) the longest,
            as in transformers' older configs (the paper's checkpoints on the Hub have them).
        pad_size: `{"height", "width"}` of a fixed canvas; None pads to the largest image of each batch.
        do_convert_annotations: give label boxes as normalised (cx, cy, w, h).
        boxes_relative_to: what those are relative to: "canvas", the padded canvas (as transformers), or "image",
            each image's own extent inside it (as the model predicts them and the loss compares them; the
            training collator uses this).
    """

    model_input_names = ["pixel_values", "pixel_mask"]

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
        do_pad=True,
        pad_size=None,
        do_convert_annotations=True,
        boxes_relative_to="canvas",
        **kwargs,
    ):
        max_size = kwargs.pop("max_size", None)  # transformers' older configs: with an int size only
        super().__init__(**kwargs)
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"shortest_edge": size, "longest_edge": 1333 if max_size is None else max_size}
        self.do_resize, self.resample, self.do_rescale, self.rescale_factor = (
            do_resize,
            int(resample),
            do_rescale,
            rescale_factor,
        )
        self.size = self._check_size(size if size is not None else {"shortest_edge": 800, "longest_edge": 1333}, "size")
        self.pad_size = None if pad_size is None else self._check_size(pad_size, "pad_size", ({"height", "width"},))
        self.do_normalize, self.do_pad, self.do_convert_annotations = do_normalize, do_pad, do_convert_annotations
        if boxes_relative_to not in ("canvas", "image"):
            raise ValueError(f'boxes_relative_to must be "canvas" or "image", got {boxes_relative_to!r}')
        self.boxes_relative_to = boxes_relative_to
        self.image_mean = self._check_channels(
            image_mean if image_mean is not None else IMAGENET_DEFAULT_MEAN, "image_mean"
        )
        self.image_std = self._check_channels(image_std if image_std is not None else IMAGENET_DEFAULT_STD, "image_std")
        if 0 in self.image_std:
            raise ValueError(f"image_std must not hold 0 (it divides the pixels), got {self.image_std}")

    @staticmethod
    def _check_channels(values, name) -> list[float]:
        """image_mean or image_std: three finite numbers (R, G, B) -> a list; ValueError naming `name`."""
        if (
            not isinstance(values, (list, tuple, np.ndarray))
            or len(values) != 3
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in values)
        ):
            raise ValueError(f"{name} must be three finite numbers, one per channel (R, G, B), got {values!r}")
        return [float(v) for v in values]

    @staticmethod
    def _check_size(size, name, kinds=SIZE_KINDS) -> dict:
        keys = " or ".join(str(sorted(k)) for k in kinds)
        if not isinstance(size, dict):
            raise ValueError(f"{name} must be a dict with the keys {keys}, got {size!r}")
        size = {k: v for k, v in size.items() if v is not None}
        if set(size) not in kinds:
            raise ValueError(f"{name} must have the keys {keys}, got {sorted(size)}")
        if any(not isinstance(v, int) or v < 1 for v in size.values()):
            raise ValueError(f"{name} values must be positive integers, got {size}")
        return size

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of an image after resizing."""
        size = self.size
        if "shortest_edge" in size:
            return get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
        if "max_height" in size:
            return get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"])
        return size["height"], size["width"]

    def preprocess(self, images, annotations=None, return_tensors=None, **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy or torch; channels first or last; gray, RGB or RGBA).
            annotations: one COCO detection dict per image, `{"image_id", "annotations": [{"bbox": [x, y, w, h],
                "category_id", "area", "iscrowd"}]}`.
        Returns:
            `pixel_values` (B, 3, H, W) float32, `pixel_mask` (B, H, W) int64, and with annotations `labels`:
            per image `class_labels` (T,), `boxes` (T, 4), `area` (T,), `iscrowd` (T,), `image_id` (1,),
            `orig_size` and `size` (2,) as (h, w).
        """
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)}; set processor options when creating it")
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
        arrays, targets, dropped = [], [], {}
        for index, image in enumerate(images):
            array = to_rgb_array(image, index)
            if 0 in array.shape[:2]:
                raise ValueError(f"image {index} has no pixels ({array.shape[1]}x{array.shape[0]})")
            if self.do_rescale and np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1:
                warnings.warn(
                    f"image {index} is floating point with values in [0, 1]: it looks already rescaled, and "
                    f"rescaling it by {self.rescale_factor:g} again leaves it nearly black; pass uint8 images or "
                    "create the processor with do_rescale=False",
                    stacklevel=2,
                )
            target = None
            if annotations is not None:
                target, dropped[index] = self.prepare_annotation(annotations[index], *array.shape[:2], index)
            if self.do_resize:
                height, width = self.output_size(*array.shape[:2])
                if target is not None:
                    ratio_h, ratio_w = height / array.shape[0], width / array.shape[1]
                    target["boxes"] = target["boxes"] * np.asarray(
                        [ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32
                    )
                    target["area"] = target["area"] * (ratio_w * ratio_h)
                array = resize_array(array, height, width, self.resample)
            array = array.astype(np.float32)
            if self.do_rescale:
                array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.do_normalize:
                array = (array - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(
                    self.image_std, dtype=np.float32
                )
            if target is not None:
                target["size"] = np.asarray(array.shape[:2], dtype=np.int64)
                if self.do_convert_annotations:
                    centers = box_xyxy_to_cxcywh(torch.from_numpy(target["boxes"])).numpy()
                    target["boxes"] = centers / np.asarray([array.shape[1], array.shape[0]] * 2, dtype=np.float32)
            arrays.append(array.transpose(2, 0, 1))
            targets.append(target)

        if sum(dropped.values()):
            where = ", ".join(f"image_id {targets[i]['image_id'][0]}: {n}" for i, n in dropped.items() if n)
            warnings.warn(
                f"dropped {sum(dropped.values())} box(es) with no area inside their image ({where})", stacklevel=2
            )
        data = {}
        if self.do_pad:
            canvas = (
                (self.pad_size["height"], self.pad_size["width"])
                if self.pad_size
                else tuple(np.max([a.shape[1:] for a in arrays], 0))
            )
            padded, masks = [], []
            for index, (array, target) in enumerate(zip(arrays, targets)):
                height, width = array.shape[1:]
                if height > canvas[0] or width > canvas[1]:
                    raise ValueError(
                        f"image {index} is {height}x{width} after resizing, "
                        f"larger than pad_size {canvas[0]}x{canvas[1]}"
                    )
                out = np.zeros((3, *canvas), dtype=np.float32)
                out[:, :height, :width] = array
                mask = np.zeros(canvas, dtype=np.int64)
                mask[:height, :width] = 1
                padded.append(out)
                masks.append(mask)
                if target is not None:
                    target["size"] = np.asarray(canvas, dtype=np.int64)
                    if self.do_convert_annotations and self.boxes_relative_to == "canvas":  # as in transformers
                        target["boxes"] = target["boxes"] * np.asarray(
                            [width / canvas[1], height / canvas[0]] * 2, dtype=np.float32
                        )
            arrays, data["pixel_mask"] = padded, masks
        data["pixel_values"] = arrays
        encoded = BatchFeature(data, tensor_type=return_tensors)
        if annotations is not None:
            encoded["labels"] = [BatchFeature(t, tensor_type=return_tensors) for t in targets]
        return encoded

    def prepare_annotation(self, annotation: dict, height: int, width: int, index: int) -> tuple[dict, int]:
        """A COCO detection dict -> arrays with xyxy boxes in pixels, clipped to the image, and how many boxes
        were dropped for having no area inside it. Crowd regions are left out, as in DETR."""
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
                and isinstance(o.get("category_id"), (int, np.integer))
                and isinstance(o.get("bbox"), (list, tuple, np.ndarray))
                and len(o["bbox"]) == 4
                and all(isinstance(v, (int, float, np.number)) for v in o["bbox"])
            ):
                raise ValueError(
                    f"image_id {image_id}, object {j}: needs an integer 'category_id' and a 4-number 'bbox' "
                    f"[x, y, w, h], got {o}"
                )
        boxes = np.asarray([o["bbox"] for o in objects], dtype=np.float32).reshape(-1, 4)
        boxes = box_xywh_to_xyxy(torch.from_numpy(boxes)).numpy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        area = np.asarray([o.get("area", o["bbox"][2] * o["bbox"][3]) for o in objects], dtype=np.float32)
        target = {
            "image_id": np.asarray([image_id], dtype=np.int64),
            "class_labels": np.asarray([o["category_id"] for o in objects], dtype=np.int64)[keep],
            "boxes": boxes[keep],
            "area": area[keep],
            "iscrowd": np.zeros(int(keep.sum()), dtype=np.int64),
            "orig_size": np.asarray([height, width], dtype=np.int64),
        }
        return target, int((~keep).sum())

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
