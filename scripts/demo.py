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

from deformable_detr import DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrImageProcessor
from deformable_detr.detect import draw_detections

BCCD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "bccd", "JPEGImages")


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
    processor = DeformableDetrImageProcessor(size={"shortest_edge": 512, "longest_edge": 853})
    inputs = processor(image, return_tensors="pt")
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs)
    print(f"ran it on {source} ({tuple(inputs['pixel_values'].shape[-2:])} pixels) in {time.perf_counter() - start:.1f} s")

    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    loaded = DeformableDetrForObjectDetection.from_pretrained(args.output_dir).eval()
    with torch.no_grad():
        again = loaded(**DeformableDetrImageProcessor.from_pretrained(args.output_dir)(image, return_tensors="pt"))
    same = torch.equal(out.logits, again.logits) and torch.equal(out.pred_boxes, again.pred_boxes)
    print(f"saved to {args.output_dir} ({', '.join(sorted(os.listdir(args.output_dir)))}); reloaded outputs identical: {same}")

    found = processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(image.height, image.width)], top_k=args.top_k)[0]
    detections = [{"label": config.id2label[l], "label_id": l, "score": s, "box": b}
                  for s, l, b in zip(found["scores"].tolist(), found["labels"].tolist(), found["boxes"].tolist())]
    print("what it found (untrained, so random):")
    for det in detections:
        print(f"  {det['label']:9s} {det['score']:.3f} at [{', '.join(f'{v:.0f}' for v in det['box'])}]")
    picture = os.path.join(args.output_dir, "detections.png")
    draw_detections(image, detections).save(picture)
    print(f"drawn: {picture}")
    if not same:
        raise SystemExit("the reloaded model disagrees with the saved one")


if __name__ == "__main__":
    main()
