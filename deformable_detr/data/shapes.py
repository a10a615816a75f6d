"""Synthetic detection datasets: shapes of random colours and sizes on a noisy background, deterministic by seed.
They give the demo, the tests and the convergence benchmark data without any download: the demo's circles,
squares and triangles apart from each other (`shapes_dataset`), and with `kinds`, `sides` and `overlap` harder
sets (many small shapes of more kinds, overlapping) or new label sets to fine-tune on."""

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .objects import objects_of_boxes
from .schema import records_to_dataset

CLASS_NAMES = ["circle", "square", "triangle"]


def _regular(corners: int, inner: float = 1.0) -> list[tuple[float, float]]:
    """A regular polygon's corners in the unit square, or with `inner` < 1 a star's (every other corner inward)."""
    points = []
    for i in range(corners * (1 if inner == 1.0 else 2)):
        radius = 0.5 if i % 2 == 0 or inner == 1.0 else 0.5 * inner
        angle = -math.pi / 2 + i * math.pi * (2 if inner == 1.0 else 1) / corners
        points.append((0.5 + radius * math.cos(angle), 0.5 + radius * math.sin(angle)))
    return points


# the polygons' outlines in the unit square; circle, square, ring and frame are drawn as ellipses and rectangles
OUTLINES = {
    "triangle": [(0.5, 0.0), (0.0, 1.0), (1.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "pentagon": _regular(5),
    "hexagon": _regular(6),
    "star": _regular(5, inner=0.4),
    "cross": [(a / 3, b / 3) for a, b in ((1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2))]
    + [(0.0, 2 / 3), (0.0, 1 / 3), (1 / 3, 1 / 3)],
    "arrow": [(0.5, 0.0), (1.0, 0.5), (0.7, 0.5), (0.7, 1.0), (0.3, 1.0), (0.3, 0.5), (0.0, 0.5)],
    "hourglass": [(0.0, 0.0), (1.0, 0.0), (0.5, 0.5), (1.0, 1.0), (0.0, 1.0), (0.5, 0.5)],
}
KINDS = ["circle", "square", "ring", "frame", *OUTLINES]  # every shape this module draws


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, side: int, colour: tuple):
    """One shape of `kind` filling the box (x, y, side, side)."""
    corners = [x, y, x + side - 1, y + side - 1]
    width = max(1, side // 5)
    if kind == "circle":
        draw.ellipse(corners, fill=colour)
    elif kind == "square":
        draw.rectangle(corners, fill=colour)
    elif kind == "ring":
        draw.ellipse(corners, outline=colour, width=width)
    elif kind == "frame":
        draw.rectangle(corners, outline=colour, width=width)
    else:
        draw.polygon([(x + u * (side - 1), y + v * (side - 1)) for u, v in OUTLINES[kind]], fill=colour)


def iou(a: list, b: list) -> float:
    """IoU of two COCO boxes (x, y, w, h)."""
    w = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def draw_shapes(
    rng: random.Random,
    size: int,
    max_objects: int,
    kinds: list[str] = CLASS_NAMES,
    sides: tuple[int, int] | None = None,
    overlap: float = 0.0,
    stop: float = 0.1,
) -> tuple[Image.Image, list, list]:
    """One image (size x size) with 1..max_objects shapes of `kinds`, their sides in `sides` (default
    size/8..size/3), each box overlapping the earlier ones with an IoU of at most `overlap` (0: they do not
    touch), and after each shape a chance of `stop` to draw no more; returns it, the COCO boxes (x, y, w, h) and
    the class ids (indices into `kinds`)."""
    low, high = sides or (size // 8, size // 3)
    background = np.asarray([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (size, size, 3))
    image = Image.fromarray((background + noise).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    boxes, categories = [], []
    for _ in range(rng.randint(1, max_objects) * 10):  # placement attempts
        if len(boxes) == max_objects or (boxes and rng.random() < stop):
            break
        side = rng.randint(low, high)
        x, y = rng.randint(0, size - side), rng.randint(0, size - side)
        box = [x, y, side, side]
        if any(iou(box, other) > overlap if overlap else iou(box, other) > 0 for other in boxes):
            continue
        colour = tuple(int(c + rng.choice((-1, 1)) * rng.randint(90, 160)) % 256 for c in background)
        category = rng.randrange(len(kinds))
        draw_shape(draw, kinds[category], x, y, side, colour)
        boxes.append(box)
        categories.append(category)
    return image, boxes, categories


def shapes_records(
    num_images: int, image_size: int = 128, max_objects: int = 4, seed: int = 0, **drawing
) -> list[dict]:
    """`num_images` rows of the detection schema (see schema.py) in a plain list (not a datasets.Dataset), images as
    PIL images; `drawing`: draw_shapes' kinds, sides, overlap and stop."""
    rng = random.Random(seed)
    records = []
    for index in range(num_images):
        image, boxes, categories = draw_shapes(rng, image_size, max_objects, **drawing)
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


def shapes_dataset(num_images: int, image_size: int = 128, max_objects: int = 4, seed: int = 0, **drawing):
    """A `datasets.Dataset` in the detection schema (see schema.py) with `num_images` images; `drawing`:
    draw_shapes' kinds (the class names, default CLASS_NAMES), sides and overlap."""
    records = shapes_records(num_images, image_size, max_objects, seed, **drawing)
    return records_to_dataset(records, drawing.get("kinds", CLASS_NAMES))
