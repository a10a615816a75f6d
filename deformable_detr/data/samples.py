"""What a training batch is: the rows of a detection dataset (the schema of schema.py) as samples, an image and
its COCO annotation, augmented reproducibly (`DetectionSamples`), and samples collated into the model's batch
(`DetectionCollator`)."""

import io
import logging
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import ExifTags, Image

from ..model.box_ops import box_area, box_xywh_to_xyxy, box_xyxy_to_xywh
from ..model.image_processing_deformable_detr import DeformableDetrImageProcessor, to_rgb_image
from .image_files import UNREADABLE, image_name
from .objects import objects_of
from .transforms import Plan

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


class DetectionSamples(torch.utils.data.Dataset):
    """Examples of a detection dataset as (image, COCO annotation) pairs for the image processor, the image id
    being the row index. With an `augmentation`, each sample is augmented by a generator seeded with
    (seed, epoch, index): the same epoch gives the same images in any process, worker or resumed run.

    An image that cannot be decoded (its header was fine when the dataset was loaded: a truncated file, one
    changed since) raises ValueError naming it; with `skip_unreadable` (training) it is skipped with a warning
    naming it and counting the skips so far, and the next image takes its place.

    With `reduced_decoding` (the default), a JPEG file that the augmentation resizes to at most half its size is
    decoded at 1/2, 1/4 or 1/8 of it (PIL's draft mode), still at least that size: it decodes and resizes several
    times faster, and its pixels differ a little from those of the full decode (docs/training.md gives how much).
    Rows of a datasets Dataset are then read with their image files undecoded, and decoded here."""

    def __init__(
        self,
        dataset: "Dataset",
        augmentation=None,
        seed: int = 0,
        skip_unreadable: bool = False,
        reduced_decoding: bool = True,
    ):
        self.dataset, self.augmentation, self.seed, self.epoch = dataset, augmentation, seed, 0
        self.skip_unreadable, self.skipped = skip_unreadable, 0
        self.reduced_decoding = reduced_decoding and augmentation is not None
        self.rows = undecoded_images(dataset) if self.reduced_decoding else dataset

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def decoded(self, index: int) -> tuple[int, dict, Image.Image, random.Random | None, Plan | None]:
        """(index, example, RGB image, the augmentation's generator and its plan) of the first image from `index` on
        that decodes; with an augmentation, a JPEG is decoded at the reduced size its plan allows."""
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            try:
                example = self.rows[row]
                image, rng, plan = opened(example["image"]), None, None
                if self.augmentation is not None:
                    rng = random.Random(f"{self.seed}:{self.epoch}:{row}")
                    plan = self.augmentation.plan(*shown_size(image), rng)
                    if self.reduced_decoding:
                        draft(image, plan.size)
                return row, example, to_rgb_image(image), rng, plan
            except UNREADABLE as error:
                name = self.image_name(row)
                if not self.skip_unreadable:
                    raise ValueError(f"{name}: cannot be decoded ({type(error).__name__}: {error})") from error
                self.skipped += 1
                logger.warning(
                    "%s cannot be decoded (%s: %s): skipped, the next image instead (%d skip(s) in this process)",
                    name,
                    type(error).__name__,
                    error,
                    self.skipped,
                )
        raise ValueError("no image of the dataset can be decoded")

    def image_name(self, row: int) -> str:
        """The name of row `row`'s image: its path (not decoded) where the rows are a datasets Dataset."""
        import datasets  # only here, on the way to an error: reading rows needs no datasets import

        rows = self.dataset
        if isinstance(rows, datasets.Dataset):
            rows = rows.cast_column("image", datasets.Image(decode=False))
        return image_name(rows[row]["image"])

    def __getitem__(self, index: int) -> dict:
        index, example, image, rng, plan = self.decoded(index)
        objects = objects_of(example)
        boxes = box_xywh_to_xyxy(torch.from_numpy(np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4))).numpy()
        categories, areas = (
            np.asarray(objects["category"], dtype=np.int64),
            np.asarray(objects["area"], dtype=np.float32),
        )
        crowds = np.asarray(objects["iscrowd"], dtype=np.int64)
        if self.augmentation is not None:
            image, boxes, keep = self.augmentation.apply(image, boxes, rng, plan)
            categories, crowds, areas = (
                categories[keep],
                crowds[keep],
                box_area(torch.from_numpy(boxes)).numpy(),
            )
        boxes = box_xyxy_to_xywh(torch.from_numpy(boxes)).numpy()
        annotation = {
            "image_id": index,
            "annotations": [  # the processor leaves crowd regions out, as DETR
                {"bbox": box.tolist(), "category_id": int(c), "area": float(a), "iscrowd": int(crowd)}
                for box, c, a, crowd in zip(boxes, categories, areas, crowds)
            ],
        }
        return {"image": image, "annotation": annotation}


def undecoded_images(rows):
    """A datasets Dataset whose `image` column decodes to PIL images as it is (mode None), with the image files
    left undecoded ({"bytes", "path"}), for `opened`; any other rows as they are."""
    import datasets

    feature = getattr(rows, "features", {}).get("image") if isinstance(rows, datasets.Dataset) else None
    if isinstance(feature, datasets.Image) and feature.decode and feature.mode is None:
        return rows.cast_column("image", datasets.Image(decode=False))
    return rows


def opened(image) -> Image.Image:
    """An image of a row: a PIL image as it is; an undecoded image file ({"bytes", "path"}) opened, not decoded yet
    (a path that is no local file, datasets decodes)."""
    if not isinstance(image, dict):
        return image
    if image.get("bytes") is not None:
        return Image.open(io.BytesIO(image["bytes"]))
    if image.get("path") is not None and os.path.isfile(image["path"]):
        return Image.open(image["path"])
    import datasets

    return datasets.Image().decode_example(image)


def turned(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it a quarter (read from the header: nothing is decoded)."""
    return image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)


def shown_size(image: Image.Image) -> tuple[int, int]:
    """(w, h) of the image as shown, its EXIF orientation applied."""
    return (image.height, image.width) if turned(image) else image.size


def draft(image: Image.Image, size: tuple[int, int]) -> None:
    """A JPEG not decoded yet will decode at the smallest of 1/1, 1/2, 1/4 and 1/8 of its size that is at least
    `size` (w, h, as shown) on both sides (PIL's draft mode); other images are left as they are."""
    image.draft(None, size[::-1] if turned(image) else size)


class DetectionCollator:
    """Samples -> the model's batch: `pixel_values`, `pixel_mask`, `labels` (per image `class_labels`,
    normalised `boxes` and the rest of the processor's labels), and `orig_sizes` (B, 2) as (h, w).

    Label boxes are relative to each image's own size (the processor's `boxes_relative_to="image"`), as the
    paper's code has them and as the model predicts them, whatever padding the batch needs."""

    def __init__(self, processor):
        self.processor = DeformableDetrImageProcessor(**{**processor.to_dict(), "boxes_relative_to": "image"})

    def __call__(self, samples: list[dict]) -> dict:
        images = [s["image"] for s in samples]
        batch = self.processor(images, annotations=[s["annotation"] for s in samples], return_tensors="pt")
        labels = [dict(label) for label in batch["labels"]]
        return {
            "pixel_values": batch["pixel_values"],
            "pixel_mask": batch["pixel_mask"],
            "labels": labels,
            "orig_sizes": torch.tensor([(im.height, im.width) for im in images]),
        }
