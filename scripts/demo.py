"""The main job, for now: build a Deformable DETR, run it on a BCCD image (or a generated one when the data
is not beside the checkout), save it as safetensors, load it back, check the outputs agree, and draw what it
found. The model is untrained until the training issue lands, so its detections are random."""

import argparse
import glob
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection

BCCD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "bccd", "JPEGImages")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def load_image(path):
    if path:
        return Image.open(path).convert("RGB"), path
    found = sorted(glob.glob(os.path.join(BCCD, "*.jpg")))
    if found:
        return Image.open(found[0]).convert("RGB"), found[0]
    rng = np.random.default_rng(0)  # a generated picture: coloured rectangles on grey
    canvas = Image.new("RGB", (640, 480), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for _ in range(5):
        x, y = rng.integers(0, 540), rng.integers(0, 380)
        draw.rectangle([x, y, x + rng.integers(30, 100), y + rng.integers(30, 100)], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return canvas, "generated"


def to_pixel_values(image, shortest=512):
    scale = shortest / min(image.size)
    resized = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    array = (np.asarray(resized, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", help="an image file (default: the first BCCD image, or a generated one)")
    parser.add_argument("--output_dir", default="outputs/demo", help="where the saved model and the picture go")
    parser.add_argument("--top_k", type=int, default=5, help="how many detections to print and draw")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = DeformableDetrConfig(num_labels=3, id2label={0: "RBC", 1: "WBC", 2: "Platelets"})
    model = DeformableDetrForObjectDetection(config).eval()
    print(f"built Deformable DETR (ResNet-50, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")

    image, source = load_image(args.image)
    pixel_values = to_pixel_values(image)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(pixel_values)
    print(f"ran it on {source} ({tuple(pixel_values.shape[-2:])} pixels) in {time.perf_counter() - start:.1f} s")

    model.save_pretrained(args.output_dir)
    loaded = DeformableDetrForObjectDetection.from_pretrained(args.output_dir).eval()
    with torch.no_grad():
        again = loaded(pixel_values)
    same = torch.equal(out.logits, again.logits) and torch.equal(out.pred_boxes, again.pred_boxes)
    print(f"saved to {args.output_dir} ({', '.join(sorted(os.listdir(args.output_dir)))}); reloaded outputs identical: {same}")

    scores = out.logits[0].sigmoid()
    top = scores.flatten().topk(args.top_k)
    draw = ImageDraw.Draw(image)
    print("what it found (untrained, so random):")
    for score, index in zip(top.values.tolist(), top.indices.tolist()):
        query, label = divmod(index, scores.shape[1])
        cx, cy, w, h = out.pred_boxes[0, query].tolist()
        box = [(cx - w / 2) * image.width, (cy - h / 2) * image.height, (cx + w / 2) * image.width, (cy + h / 2) * image.height]
        name = config.id2label[label]
        print(f"  {name:9s} {score:.3f} at [{', '.join(f'{v:.0f}' for v in box)}]")
        draw.rectangle(box, outline=(255, 0, 0), width=3)
        draw.text((box[0] + 3, box[1] + 3), f"{name} {score:.2f}", fill=(255, 0, 0))
    picture = os.path.join(args.output_dir, "detections.png")
    image.save(picture)
    print(f"drawn: {picture}")
    if not same:
        raise SystemExit("the reloaded model disagrees with the saved one")


if __name__ == "__main__":
    main()
