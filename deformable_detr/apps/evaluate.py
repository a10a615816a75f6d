"""`deformable-detr-evaluate`: the COCO metrics of a saved model on a split of a dataset, written as JSON, and the
evaluation pictures."""

import json
import os

import torch

from ..data.samples import DetectionCollator, DetectionSamples
from ..data.sources import load_detection_dataset
from ..metrics.evaluation import coco_ground_truth, coco_metrics, detections_of
from ..metrics.evaluation_plots import write_evaluation_pictures
from ..utils.devices import accelerator_options
from ..utils.file_writing import check_writable, replaced_when_done
from .detect import load_detector, resize_sides


def evaluate_saved_model(
    model_path: str,
    dataset: str,
    split: str = "validation",
    batch_size: int = 2,
    num_workers: int = 0,
    output: str | None = None,
    validation_fraction: float = 0.15,
    seed: int = 42,
    skip_bad_images: bool = False,
    output_dir: str | None = None,
    device: str | None = None,
) -> dict:
    """The COCO metrics of a saved model (ours or transformers', a folder or a Hub id) on a split of `dataset`
    (any source `load_detection_dataset` reads; validation_fraction and seed as in training, for data without a
    validation split; device: cpu, cuda or mps, default the accelerator's: `accelerator_options`). Writes them as
    JSON to `output` if given, and the evaluation pictures
    (`write_evaluation_pictures`: precision-recall curves, confusion matrix, their numbers) into `output_dir` if
    given; both paths are checked first (`check_output`: one that cannot be written fails before the work). Raises
    ValueError when the split is missing or the model's classes are not the data's."""
    from accelerate import Accelerator

    if output:
        check_output(output)
    if output_dir:
        check_writable(os.path.join(output_dir, "confusion_matrix.png"))
    accelerator = Accelerator(**accelerator_options(device))
    model, processor = load_detector(model_path, accelerator.device)
    # images the model's processor would resize to nothing are found at load, by name
    sides = resize_sides(processor)
    sizes = {} if sides is None else {"image_size": sides[0], "max_image_size": sides[1]}
    splits, class_names = load_detection_dataset(dataset, validation_fraction, seed, skip_bad_images, **sizes)
    if split not in splits:
        raise ValueError(f"{dataset} has no split {split!r}; it has {sorted(splits)}")
    model_classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if model_classes != class_names:
        raise ValueError(f"the model's classes {model_classes} are not {dataset}'s {class_names} (in that order)")
    examples = splits[split]
    loader = torch.utils.data.DataLoader(
        DetectionSamples(examples),
        batch_size=batch_size,
        collate_fn=DetectionCollator(processor),
        num_workers=num_workers,
    )
    ground_truth = coco_ground_truth(examples, class_names)
    detections = detections_of(model, processor, accelerator.prepare(loader), accelerator)
    metrics = coco_metrics(ground_truth, detections)
    if accelerator.is_main_process and output_dir:
        write_evaluation_pictures(ground_truth, detections, output_dir)
    if accelerator.is_main_process and output:
        write_metrics(metrics, output)
    accelerator.end_training()
    return metrics


def check_output(output: str):
    """Before the work: ValueError if the metrics JSON `output` is a folder, OSError naming it if it cannot be
    written (its folder is created)."""
    if os.path.isdir(output):
        raise ValueError(f"output {output!r} is a folder; give the path of a JSON file")
    check_writable(output)


def write_metrics(metrics: dict, output: str):
    """`metrics` as JSON in `output`, written whole or not at all."""
    with replaced_when_done(output) as temporary, open(temporary, "w") as f:
        json.dump(metrics, f, indent=2)
