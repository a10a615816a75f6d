"""DETR's training augmentation, with the boxes kept right: horizontal flip, then either a multi-scale
resize, or a resize, a random crop and a multi-scale resize (each with probability 1/2).

At `image_size=800` the sizes are DETR's: shortest side 480..800 in steps of 32 (longest at most 1333),
crops of 384..600 pixels from images resized to 400/500/600. Other image sizes scale all of them.
Randomness comes from a `random.Random` passed in, so a sample's augmentation is reproducible. Its first draws
(flip, crop, the first resize's size) need only the image's size, so that a JPEG can be decoded at the reduced
size that resize asks for (`DetrAugmentation.plan`, then `DetrAugmentation.apply` to the pixels).
"""

import dataclasses
import random

import numpy as np
from PIL import Image
from transformers.image_transforms import get_size_with_aspect_ratio


def resize(image: Image.Image, boxes: np.ndarray, shortest_edge: int, longest_edge: int | None):
    """Shortest side to `shortest_edge`, unless the longest would pass `longest_edge`. boxes: (N, 4) xyxy pixels."""
    height, width = get_size_with_aspect_ratio((image.height, image.width), shortest_edge, longest_edge)
    return resize_to(image, boxes, (width, height))


def resize_to(image: Image.Image, boxes: np.ndarray, size: tuple[int, int], source: tuple[int, int] | None = None):
    """The image resized to `size` (w, h); boxes (N, 4) xyxy in pixels of an image of `source` (w, h), by default
    the image's own size (another where the image was decoded at a reduced size), scaled to it."""
    source_width, source_height = source or image.size
    scale = np.asarray([size[0] / source_width, size[1] / source_height] * 2, dtype=np.float32)
    return image.resize(size, Image.BILINEAR), boxes * scale


def hflip(image: Image.Image, boxes: np.ndarray, width: int | None = None):
    """Flipped left to right; boxes (N, 4) xyxy in pixels of an image `width` wide (by default the image's)."""
    width = image.width if width is None else width
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


def crop(image: Image.Image, boxes: np.ndarray, left: int, top: int, width: int, height: int):
    """Boxes are shifted and clipped to the crop; returns a mask of those that keep an area."""
    boxes = (boxes - np.asarray([left, top, left, top], dtype=np.float32)).clip(0, [width, height, width, height])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image.crop((left, top, left + width, top + height)), boxes, keep


@dataclasses.dataclass(frozen=True)
class Plan:
    """What DETR's augmentation of one image draws before it needs the pixels: whether it flips, whether it
    crops, and the (w, h) `size` of its first resize, for an image of `source` (w, h)."""

    flip: bool
    crop: bool
    source: tuple[int, int]
    size: tuple[int, int]


class DetrAugmentation:
    """DETR's training augmentation; `scales`, the shortest sides to choose from, default to DETR's 480..800 in
    steps of 32, scaled by image_size / 800."""

    def __init__(self, image_size: int = 800, max_size: int = 1333, scales: list[int] | None = None):
        self.image_size, self.max_size = image_size, max_size
        self.scales = scales or list(range(image_size, int(0.6 * image_size) - 1, -32))[::-1]
        self.crop_resize = [round(s * image_size / 800) for s in (400, 500, 600)]
        self.crop_range = (round(384 * image_size / 800), round(600 * image_size / 800))

    def __call__(self, image: Image.Image, boxes: np.ndarray, rng: random.Random):
        """boxes: (N, 4) x0, y0, x1, y1 in pixels. Returns the new image, its boxes (M, 4) and a keep mask (N,)
        telling which of the input boxes they are."""
        return self.apply(image, boxes, rng, self.plan(image.width, image.height, rng))

    def plan(self, width: int, height: int, rng: random.Random) -> Plan:
        """The first draws for an image of width x height: the rest come from `rng` in `apply`."""
        flip, crop = rng.random() < 0.5, rng.random() < 0.5
        shortest, longest = (rng.choice(self.crop_resize), None) if crop else (rng.choice(self.scales), self.max_size)
        size = get_size_with_aspect_ratio((height, width), shortest, longest)[::-1]
        return Plan(flip, crop, (width, height), size)

    def apply(self, image: Image.Image, boxes: np.ndarray, rng: random.Random, plan: Plan):
        """`__call__` with its first draws made: the image may be of another size than `plan.source` (decoded at
        a reduced size), the boxes are in pixels of that."""
        keep = np.ones(len(boxes), dtype=bool)
        if plan.flip:
            image, boxes = hflip(image, boxes, plan.source[0])
        image, boxes = resize_to(image, boxes, plan.size, plan.source)
        if plan.crop:
            width = rng.randint(min(self.crop_range[0], image.width), min(image.width, self.crop_range[1]))
            height = rng.randint(min(self.crop_range[0], image.height), min(image.height, self.crop_range[1]))
            left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
            image, boxes, keep = crop(image, boxes, left, top, width, height)
            boxes = boxes[keep]
            image, boxes = resize(image, boxes, rng.choice(self.scales), self.max_size)
        return image, boxes, keep
