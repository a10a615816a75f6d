"""Detect objects in images with a saved Deformable DETR: one JSON of detections and one picture with the
boxes drawn per image. Unreadable images are reported by name and skipped."""

import argparse
import colorsys
import glob
import json
import os
import sys

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tqdm.auto import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def find_images(inputs: list[str]) -> list[str]:
    """Files, folders (their images, sorted) and glob patterns -> image paths, in order, without repeats."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.exists(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no image, folder or glob match for {item!r}")
            paths += matches
    return list(dict.fromkeys(paths))


def class_colour(label: int) -> tuple[int, int, int]:
    """Distinct, saturated colours: hues spaced by the golden ratio."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: list[dict]) -> Image.Image:
    """Boxes in their class colour, with "name score" on a filled tag above each box."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, image.height // 40))
    width = max(2, image.height // 250)
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        colour = class_colour(det["label_id"])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_y = y0 - (bottom - top) - 4 if y0 - (bottom - top) - 4 >= 0 else y0
        draw.rectangle([x0, tag_y, x0 + right - left + 4, tag_y + bottom - top + 4], fill=colour)
        draw.text((x0 + 2 - left, tag_y + 2 - top), text, fill=(0, 0, 0), font=font)
    return image


def load_detector(model_path: str, device: str):
    """Our detector (converted when the folder or Hub id holds transformers' model) and its processor."""
    from . import DeformableDetrImageProcessor
    from .convert_deformable_detr import load_model

    model = load_model(model_path)
    try:
        processor = DeformableDetrImageProcessor.from_pretrained(model_path)
    except OSError:
        processor = DeformableDetrImageProcessor()
    return model.to(device).eval(), processor


def detect(model, processor, images: list[Image.Image], threshold: float, top_k: int) -> list[list[dict]]:
    inputs = processor(images, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = [(im.height, im.width) for im in images]
    results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes, top_k=top_k)
    id2label = model.config.id2label
    return [
        [
            {
                "label": id2label.get(label, str(label)),
                "label_id": label,
                "score": round(s, 5),
                "box": [round(v, 2) for v in b],
            }
            for s, label, b in zip(r["scores"].tolist(), r["labels"].tolist(), r["boxes"].tolist())
        ]
        for r in results
    ]


def read_image(path: str) -> Image.Image:
    from PIL import ImageOps

    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def run(args) -> dict:
    """Returns {"written": [...], "skipped": {path: reason}}."""
    paths = find_images(args.inputs)
    model, processor = load_detector(args.model, args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    written, skipped = [], {}
    batches = [paths[i : i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    for batch in tqdm(batches, desc="detecting", unit="batch", disable=len(paths) <= 1):
        images, names = [], []
        for path in batch:
            try:
                images.append(read_image(path))
                names.append(path)
            except (OSError, UnidentifiedImageError, ValueError) as error:
                skipped[path] = f"{type(error).__name__}: {error}"
                tqdm.write(f"skipped {path}: cannot read it as an image ({error})", file=sys.stderr)
        if not images:
            continue
        for path, image, found in zip(names, images, detect(model, processor, images, args.threshold, args.top_k)):
            stem = os.path.splitext(os.path.basename(path))[0]
            with open(os.path.join(args.output_dir, f"{stem}.json"), "w") as f:
                json.dump(
                    {"image": path, "width": image.width, "height": image.height, "detections": found}, f, indent=1
                )
            draw_detections(image, found).save(os.path.join(args.output_dir, f"{stem}.{args.image_format}"))
            written.append(path)
    print(f"{len(written)} image(s) written to {args.output_dir}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return {"written": written, "skipped": skipped}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="deformable-detr-detect", description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or glob patterns (quote them)")
    parser.add_argument(
        "--model", required=True, help="a saved model folder or Hub id (ours, or transformers' Deformable DETR)"
    )
    parser.add_argument(
        "--output_dir", default="detections", help="where the JSON files and pictures go (default: detections)"
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score of a detection (default: 0.5)")
    parser.add_argument("--top_k", type=int, default=100, help="at most this many detections per image (default: 100)")
    parser.add_argument("--batch_size", type=int, default=4, help="images per forward pass (default: 4)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if present)",
    )
    parser.add_argument("--image_format", choices=["jpg", "png"], default="jpg", help="format of the drawn pictures")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be at least 1")
    return args


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
