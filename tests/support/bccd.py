"""The BCCD blood cell images: 13 vendored under tests/data/bccd, and the full set where this project's CI has it."""

import xml.etree.ElementTree as ET
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
BCCD = TESTS / "data" / "bccd"  # 13 images of BCCD, vendored (see its README)
BCCD_FULL = TESTS.parents[1] / "shared" / "datasets" / "bccd"  # only beside this project's CI
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]


def bccd_example(name: str, image_id: int = 0):
    """A BCCD image and its Pascal VOC boxes as a COCO detection annotation."""
    from PIL import Image

    objects = []
    for obj in ET.parse(BCCD / "Annotations" / f"{name}.xml").findall("object"):
        box = obj.find("bndbox")
        x0, y0, x1, y1 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append(
            {
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "category_id": BCCD_CLASSES.index(obj.find("name").text.strip()),
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
            }
        )
    return Image.open(BCCD / "JPEGImages" / f"{name}.jpg"), {"image_id": image_id, "annotations": objects}
