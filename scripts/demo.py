"""`make demo`: the whole job on synthetic data, on a CPU, in about seven minutes (2 cores).

1. generates a shapes detection dataset (circles, squares, triangles; deterministic by --seed),
2. trains a small Deformable DETR from scratch with the training command (progress bars, COCO mAP every epoch),
3. scores it on held-out images with pycocotools,
4. draws its detections on held-out images, and plots the training loss and the mAP over time.
"""

import argparse
import json
import os
import shutil
import time

from datasets import DatasetDict, load_from_disk
from PIL import Image

from deformable_detr.apps.cli import HelpFormatter
from deformable_detr.apps.detect import load_detector
from deformable_detr.apps.evaluate import evaluate_saved_model
from deformable_detr.data.shapes import shapes_dataset
from deformable_detr.engine import TrainingOptions, train
from deformable_detr.engine.curves import plot_training
from deformable_detr.metrics.evaluation import format_metrics
from deformable_detr.metrics.predictions import detect
from deformable_detr.utils.drawing import draw_detections

# the tiny preset with box refinement and 30 queries (at most 4 shapes per image), trained from scratch
MODEL = {"num_queries": 30, "with_box_refine": True}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo", help="where data, model, pictures and scores go")
    parser.add_argument("--train_images", type=int, default=1500, help="training images to generate")
    parser.add_argument("--eval_images", type=int, default=200, help="validation images, and as many test images")
    parser.add_argument("--epochs", type=int, default=4, help="passes over the training images (an mAP point each)")
    parser.add_argument("--image_size", type=int, default=128, help="side of the square images")
    parser.add_argument("--seed", type=int, default=0, help="of the data and the training")
    return parser.parse_args()


def main():
    args = parse_args()
    started = time.time()
    data_dir, model_dir = os.path.join(args.output_dir, "data"), os.path.join(args.output_dir, "model")
    pictures_dir = os.path.join(args.output_dir, "detections")
    size, count = args.image_size, args.eval_images
    print(f"1/4 generating {args.train_images} training, {count} validation and {count} test images in {data_dir}")
    DatasetDict(
        train=shapes_dataset(args.train_images, size, seed=args.seed),
        validation=shapes_dataset(count, size, seed=args.seed + 1),
        test=shapes_dataset(count, size, seed=args.seed + 2),
    ).save_to_disk(data_dir)

    print("2/4 training")
    shutil.rmtree(model_dir, ignore_errors=True)  # the demo's own folder: a second demo trains afresh
    train(
        TrainingOptions(
            dataset=data_dir,
            output_dir=model_dir,
            config_name="tiny",
            config_overrides=MODEL,
            image_size=size,
            max_image_size=size,
            per_device_train_batch_size=8,
            # plenty of generated images and a short run: no augmentation, and a higher lr, for the backbone too
            no_augmentation=True,
            learning_rate=5e-4,
            backbone_learning_rate=5e-4,
            num_train_epochs=args.epochs,
            num_workers=1,
            checkpointing_steps="no",
            seed=args.seed,
        )
    )

    print("3/4 scoring on the held-out test images")
    metrics = evaluate_saved_model(
        model_dir, data_dir, "test", output=os.path.join(args.output_dir, "test_results.json")
    )
    print(format_metrics(metrics))

    print("4/4 drawing detections and the training curves")
    os.makedirs(pictures_dir, exist_ok=True)
    model, processor = load_detector(model_dir, "cpu")
    images = [row["image"] for row in load_from_disk(data_dir)["test"].select(range(min(8, count)))]
    detections, _ = detect(model, processor, images, threshold=0.5, top_k=30)
    for index, (image, found) in enumerate(zip(images, detections)):
        draw_detections(
            image.resize((4 * size, 4 * size), Image.NEAREST), [d | {"box": [4 * v for v in d["box"]]} for d in found]
        ).save(os.path.join(pictures_dir, f"test_{index}.png"))
    with open(os.path.join(model_dir, "history.json")) as f:
        plot_training(json.load(f), os.path.join(args.output_dir, "training.png"))

    minutes = (time.time() - started) / 60
    print(f"\ndone in {minutes:.1f} minutes; test mAP@[.5:.95] {metrics['map']:.3f}, mAP@.50 {metrics['map_50']:.3f}")
    print(f"  data:        {data_dir}")
    print(f"  model:       {model_dir} (with its model card, README.md)")
    print(f"  test scores: {os.path.join(args.output_dir, 'test_results.json')}")
    print(f"  detections:  {pictures_dir}/test_*.png")
    print(f"  curves:      {os.path.join(args.output_dir, 'training.png')}")


if __name__ == "__main__":
    main()
