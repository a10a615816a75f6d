"""A synthetic detection dataset: circles, squares and triangles of random colours and sizes on a noisy
background, deterministic by seed. It gives the demo and the tests data without any download."""

import random

import numpy as np
from PIL import Image, ImageDraw

from .objects import objects_of_boxes
from .schema import records_to_dataset

CLASS_NAMES = ["circle", "square", "triangle"]


def draw_shapes(rng: random.Random, size: int, max_objects: int) -> tuple[Image.Image, list, list]:
    """One image (size x size) with 1..max_objects shapes that do not overlap; returns it, the COCO boxes
    (x, y, w, h) and the class ids."""
    background = np.asarray([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (size, size, 3))
    image = Image.fromarray((background + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, categories = [], []
    for _ in range(rng.randint(1, max_objects) * 10):  # placement attempts
        if len(boxes) == max_objects or (boxes and rng.random() < 0.1):
            break
        side = rng.randint(size // 8, size // 3)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        if any(x < bx + bw and bx < x + side and y < by + bh and by < y + side for bx, by, bw, bh in boxes):
            continue
        colour = tuple(int(c + rng.choice((-1, 1)) * rng.randint(90, 160)) % 256 for c in background)
        category = rng.randrange(len(CLASS_NAMES))
        corners = [x, y, x + side - 1, y + side - 1]
        if CLASS_NAMES[category] == "circle":
            draw.ellipse(corners, fill=colour)
        elif CLASS_NAMES[category] == "square":
            draw.rectangle(corners, fill=colour)
        else:
            draw.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=colour)
        boxes.append([x, y, side, side])
        categories.append(category)
    return image, boxes, categories


def shapes_records(num_images: int, image_size: int = 128, max_objects: int = 4, seed: int = 0) -> list[dict]:
    """`num_images` rows of the detection schema (see schema.py) in a plain list (not a datasets.Dataset), images as
    PIL images."""
    rng = random.Random(seed)
    records = []
    for index in range(num_images):
        image, boxes, categories = draw_shapes(rng, image_size, max_objects)
        records.append(
            {
                "image": image,
                "image_id": index,
                "width": image_size,
                "height": image_size,
                "objects": objects_of_boxes(boxes, categories),
            }
        )
    return records


def shapes_dataset(num_images: int, image_size: int = 128, max_objects: int = 4, seed: int = 0):
    """A `datasets.Dataset` in the detection schema (see schema.py) with `num_images` images."""
    return records_to_dataset(shapes_records(num_images, image_size, max_objects, seed), CLASS_NAMES)
