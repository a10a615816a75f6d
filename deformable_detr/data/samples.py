"""What a training batch is: the rows of a detection dataset (the schema of schema.py) as samples, an image and
its COCO annotation, augmented reproducibly (`DetectionSamples`), and samples collated into the model's batch
(`DetectionCollator`)."""

import logging
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..model.box_ops import box_area, box_xywh_to_xyxy, box_xyxy_to_xywh
from ..model.image_processing_deformable_detr import DeformableDetrImageProcessor, to_rgb_image
from .image_files import UNREADABLE, image_name
from .objects import objects_of

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger(__name__)


class DetectionSamples(torch.utils.data.Dataset):
    """Examples of a detection dataset as (image, COCO annotation) pairs for the image processor, the image id
    being the row index. With an `augmentation`, each sample is augmented by a generator seeded with
    (seed, epoch, index): the same epoch gives the same images in any process, worker or resumed run.

    An image that cannot be decoded (its header was fine when the dataset was loaded: a truncated file, one
    changed since) raises ValueError naming it; with `skip_unreadable` (training) it is skipped with a warning
    naming it and counting the skips so far, and the next image takes its place."""

    def __init__(self, dataset: "Dataset", augmentation=None, seed: int = 0, skip_unreadable: bool = False):
        self.dataset, self.augmentation, self.seed, self.epoch = dataset, augmentation, seed, 0
        self.skip_unreadable, self.skipped = skip_unreadable, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def decoded(self, index: int) -> tuple[int, dict, Image.Image]:
        """(index, example, RGB image) of the first image from `index` on that decodes."""
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            try:
                example = self.dataset[row]
                return row, example, to_rgb_image(example["image"])
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
        index, example, image = self.decoded(index)
        objects = objects_of(example)
        boxes = box_xywh_to_xyxy(torch.from_numpy(np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4))).numpy()
        categories, areas = (
            np.asarray(objects["category"], dtype=np.int64),
            np.asarray(objects["area"], dtype=np.float32),
        )
        crowds = np.asarray(objects["iscrowd"], dtype=np.int64)
        if self.augmentation is not None:
            rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
            image, boxes, keep = self.augmentation(image, boxes, rng)
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
