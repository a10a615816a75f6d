"""DETR's training augmentation, with the boxes kept right: horizontal flip, then either a multi-scale
resize, or a resize, a random crop and a multi-scale resize (each with probability 1/2).

At `image_size=800` the sizes are DETR's: shortest side 480..800 in steps of 32 (longest at most 1333),
crops of 384..600 pixels from images resized to 400/500/600. Other image sizes scale all of them.
Randomness comes from a `random.Random` passed in, so a sample's augmentation is reproducible.
"""

import random

import numpy as np
from PIL import Image
from transformers.image_transforms import get_size_with_aspect_ratio


def resize(image: Image.Image, boxes: np.ndarray, shortest_edge: int, longest_edge: int | None):
    """Shortest side to `shortest_edge`, unless the longest would pass `longest_edge`. boxes: (N, 4) xyxy pixels."""
    height, width = get_size_with_aspect_ratio((image.height, image.width), shortest_edge, longest_edge)
    scale = np.asarray([width / image.width, height / image.height] * 2, dtype=np.float32)
    return image.resize((width, height), Image.BILINEAR), boxes * scale


def hflip(image: Image.Image, boxes: np.ndarray):
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = image.width - boxes[:, 2], image.width - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), flipped


def crop(image: Image.Image, boxes: np.ndarray, left: int, top: int, width: int, height: int):
    """Boxes are shifted and clipped to the crop; returns a mask of those that keep an area."""
    boxes = (boxes - np.asarray([left, top, left, top], dtype=np.float32)).clip(0, [width, height, width, height])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image.crop((left, top, left + width, top + height)), boxes, keep


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
        keep = np.ones(len(boxes), dtype=bool)
        if rng.random() < 0.5:
            image, boxes = hflip(image, boxes)
        if rng.random() < 0.5:
            image, boxes = resize(image, boxes, rng.choice(self.crop_resize), None)
            width = rng.randint(min(self.crop_range[0], image.width), min(image.width, self.crop_range[1]))
            height = rng.randint(min(self.crop_range[0], image.height), min(image.height, self.crop_range[1]))
            left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
            image, boxes, keep = crop(image, boxes, left, top, width, height)
            boxes = boxes[keep]
        image, boxes = resize(image, boxes, rng.choice(self.scales), self.max_size)
        return image, boxes, keep
