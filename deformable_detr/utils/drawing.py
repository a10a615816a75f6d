"""Detections drawn on an image: boxes in class colours with a "name score" tag, for `deformable-detr-detect`,
`deformable-detr-data show` and the pictures logged to trackers."""

import colorsys

from PIL import Image, ImageDraw, ImageFont


def class_colour(label: int) -> tuple[int, int, int]:
    """Distinct, saturated colours: hues spaced by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: list[dict]) -> Image.Image:
    """Boxes in their class colour, with "name score" on a filled tag above each box ("name" without a score: the
    data's own boxes, as `deformable-detr-data show` draws them)."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 40))
    width = max(2, image.height // 250)
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        colour = class_colour(det["label_id"])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = det["label"] if det.get("score") is None else f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_y = y0 - (bottom - top) - 4 if y0 - (bottom - top) - 4 >= 0 else y0
        draw.rectangle([x0, tag_y, x0 + right - left + 4, tag_y + bottom - top + 4], fill=colour)
        draw.text((x0 + 2 - left, tag_y + 2 - top), text, fill=(0, 0, 0), font=font)
    return image
