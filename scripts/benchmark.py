"""Speed and memory of ours against the baselines, measured in one process, alternating, medians reported:

  (a) the multi-scale deformable attention op, forward and forward+backward, at the encoder shapes of one
      800x1066 image and at decoder shapes (300 queries, batch 2): our fastest backend vs the grid_sample reference;
  (b) full-size inference (ResNet-50, 6+6 layers, 300 queries, one 800x1066 image): ours vs transformers'
      DeformableDetrForObjectDetection with the same weights (their outputs must agree to 1e-4);
  (c) one training step (forward + backward + AdamW) at batch 2: ours vs transformers;
  (d) ONNX (`--only export`, CPU): the export of (b)'s model (its time, and the file's outputs against PyTorch at
      three sizes, for it and for the single-scale, box-refinement and two-stage variants), then inference of one
      800x1066 image in onnxruntime against our PyTorch model and transformers';
  (e) memory (`--only memory`): one training step of (c) with and without gradient checkpointing (the backbone
      stages and the encoder and decoder layers recomputed in the backward pass);
  (f) COCO evaluation (`--only evaluation`) of 5,000 images x 100 detections: faster-coco-eval against
      pycocotools, and whether their twelve numbers agree;
  (h) the input pipeline (`--only data`): images/s per core of the training samples and collator (decoding, DETR's
      augmentation at 800 px, normalising and padding), one process and one torch thread, on the vendored BCCD
      photos at their 640x480 and enlarged to 1920x1440 (where decoding at reduced size pays).

Peak memory is the growth of the process's peak resident memory during one call (Linux: VmHWM after
resetting it); on a GPU, torch.cuda.max_memory_allocated.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

from deformable_detr.apps.onnx_export import max_abs_difference
from deformable_detr.model.ms_deform_attn import available_backends, multi_scale_deformable_attention
from deformable_detr.model.ms_deform_attn_inputs import op_inputs
from deformable_detr.testing import full_size_pair
from deformable_detr.utils.benchmarking import device_name, median_times, peak_memory


def compare(name, ours, theirs, device, repeats, labels=("ours", "baseline")):
    """Alternates the two, `repeats` times each after one warm-up; prints medians, the ratio and peak memory."""
    a, b = median_times((ours, theirs), device, repeats)
    memory = {label: peak_memory(fn, device) for label, fn in zip(labels, (ours, theirs))}
    print(
        f"{name:44s} {labels[0]} {a * 1e3:9.1f} ms  {labels[1]} {b * 1e3:9.1f} ms  speed-up {b / a:5.2f}x  "
        f"peak extra memory {memory[labels[0]]:7.0f} / {memory[labels[1]]:7.0f} MiB "
        f"({memory[labels[0]] / max(memory[labels[1]], 1e-9):.2f})",
        flush=True,
    )
    return b / a


def infer(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs)


def bench_op(device, repeats):
    fastest = available_backends(device)[0]
    print(f"\n(a) multi-scale deformable attention: {fastest} vs reference")
    cases = {  # shape sets of deformable_detr/model/ms_deform_attn_inputs.py, and the batch
        "encoder, 1 image 800x1066": ("encoder_800x1066", 1),
        "decoder, 300 queries, batch 2": ("decoder", 2),
    }
    for case, (shape_set, batch) in cases.items():
        value, shapes, locations, weights = op_inputs(shape_set, batch, device=device)

        def forward(backend):
            with torch.no_grad():
                return multi_scale_deformable_attention(value, shapes, locations, weights, backend=backend)

        diff = (forward(fastest) - forward("reference")).abs().max().item()
        compare(
            f"{case}: forward (max diff {diff:.1e})",
            lambda: forward(fastest),
            lambda: forward("reference"),
            device,
            repeats,
            (fastest, "reference"),
        )
        grad_inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
        grad_output = torch.randn(batch, locations.shape[1], value.shape[2] * value.shape[3], device=device)

        def forward_backward(backend):
            for t in grad_inputs:
                t.grad = None
            out = multi_scale_deformable_attention(
                grad_inputs[0], shapes, grad_inputs[1], grad_inputs[2], backend=backend
            )
            out.backward(grad_output)

        compare(
            f"{case}: forward+backward",
            lambda: forward_backward(fastest),
            lambda: forward_backward("reference"),
            device,
            repeats,
            (fastest, "reference"),
        )


def bench_model(device, repeats, train_repeats):
    hf, ours = full_size_pair(device)
    hf.eval(), ours.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 800, 1066, generator=g).to(device)
    print("\n(b) full model inference, ResNet-50, 6+6 layers, 300 queries, one 800x1066 image: ours vs transformers")
    with torch.no_grad():
        a, b = ours(x), hf(pixel_values=x)
    diff = max_abs_difference(a, b)
    print(f"outputs agree: max abs diff {diff:.2e} ({'within' if diff <= 1e-4 else 'OUTSIDE'} 1e-4)")

    compare(
        "inference",
        lambda: infer(ours, pixel_values=x),
        lambda: infer(hf, pixel_values=x),
        device,
        repeats,
        ("ours", "transformers"),
    )

    print("\n(c) one training step (forward + backward + AdamW), batch 2 of 800x1066: ours vs transformers")
    batch, labels = training_batch(device)
    for model in (hf, ours):
        model.train()
        model.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(model, **kwargs):
        model.optimizer.zero_grad()
        out = model(**kwargs, labels=labels)
        out.loss.backward()
        model.optimizer.step()

    compare(
        "training step",
        lambda: step(ours, pixel_values=batch),
        lambda: step(hf, pixel_values=batch),
        device,
        train_repeats,
        ("ours", "transformers"),
    )


def training_batch(device, batch_size=2):
    """A batch of 800x1066 images with a few boxes each, for a training step."""
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, 800, 1066, generator=g).to(device)
    labels = [
        {
            "class_labels": torch.tensor([1, 5, 17], device=device),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4], [0.8, 0.2, 0.1, 0.1]], device=device),
        },
        {
            "class_labels": torch.tensor([3], device=device),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.6]], device=device),
        },
    ][:batch_size]
    return pixel_values, labels


def bench_memory(device, repeats):
    import copy

    from deformable_detr.model.gradient_checkpointing import set_gradient_checkpointing

    _, plain = full_size_pair(device)
    checkpointed = copy.deepcopy(plain)
    set_gradient_checkpointing(checkpointed)
    pixel_values, labels = training_batch(device)
    print("\n(e) one training step (forward + backward), batch 2 of 800x1066: gradient checkpointing on vs off")

    def step(model):
        model.train()
        model.zero_grad()
        model(pixel_values=pixel_values, labels=labels).loss.backward()

    compare(
        "training step",
        lambda: step(checkpointed),
        lambda: step(plain),
        device,
        repeats,
        ("checkpointing", "without"),
    )


def bench_evaluation():
    from deformable_detr.metrics.evaluation import SUMMARY_NAMES, coco_metrics
    from deformable_detr.testing import synthetic_coco

    gt, detections = synthetic_coco()
    print("\n(f) COCO evaluation, 5,000 images x 100 detections: faster-coco-eval vs pycocotools")
    results, seconds = {}, {}
    for tools in ("faster-coco-eval", "pycocotools"):
        start = time.perf_counter()
        results[tools] = coco_metrics(gt, detections, tools)
        seconds[tools] = time.perf_counter() - start
    difference = max(abs(results["faster-coco-eval"][k] - results["pycocotools"][k]) for k in SUMMARY_NAMES)
    print(
        f"faster-coco-eval {seconds['faster-coco-eval']:.1f} s, pycocotools {seconds['pycocotools']:.1f} s "
        f"({seconds['pycocotools'] / seconds['faster-coco-eval']:.1f}x); largest difference of the twelve numbers "
        f"{difference:.1e}"
    )


def bench_export(repeats):
    import tempfile

    import onnxruntime

    from deformable_detr import DeformableDetrForObjectDetection
    from deformable_detr.apps.onnx_detector import OnnxDetector
    from deformable_detr.apps.onnx_export import _example_inputs, export_onnx

    device = torch.device("cpu")
    hf, ours = full_size_pair(device)
    hf.eval(), ours.eval()
    print(f"\n(d) ONNX, ResNet-50, 6+6 layers, 300 queries; onnxruntime {onnxruntime.__version__}")
    sizes = [(800, 1066), (640, 480), (512, 704)]
    variants = {
        "default": ours,
        "single-scale": dict(num_feature_levels=1),
        "box refinement": dict(with_box_refine=True),
        "two-stage": dict(with_box_refine=True, two_stage=True),
    }
    with tempfile.TemporaryDirectory() as folder:
        for name, variant in variants.items():
            if isinstance(variant, dict):
                torch.manual_seed(0)
                variant = DeformableDetrForObjectDetection(
                    ours.config.__class__(**{**ours.config.to_dict(), **variant})
                )
            variant.eval().save_pretrained(os.path.join(folder, name))
            path = os.path.join(folder, f"{name}.onnx")
            report = export_onnx(os.path.join(folder, name), path, check=False)
            detector, differences = OnnxDetector(path), []
            for index, size in enumerate(sizes):
                pixel_values, pixel_mask = _example_inputs(1, size, padded=False, seed=index)
                with torch.no_grad():
                    expected = variant(pixel_values=pixel_values, pixel_mask=pixel_mask)
                got = detector(pixel_values=pixel_values, pixel_mask=pixel_mask)
                differences.append(max_abs_difference(got, expected))
            print(
                f"{name:16s} export {report['seconds']:5.1f} s, max abs difference from PyTorch at "
                + ", ".join(f"{h}x{w} {d:.1e}" for (h, w), d in zip(sizes, differences)),
                flush=True,
            )
        detector = OnnxDetector(os.path.join(folder, "default.onnx"))
        x = torch.randn(1, 3, 800, 1066, generator=torch.Generator().manual_seed(0))
        mask = torch.ones(1, 800, 1066, dtype=torch.int64)
        for label, model in (("ours (PyTorch)", ours), ("transformers", hf)):
            compare(
                "inference, 800x1066",
                lambda: detector(pixel_values=x, pixel_mask=mask),
                lambda model=model: infer(model, pixel_values=x, pixel_mask=mask),
                device,
                repeats,
                ("onnxruntime", label),
            )


def pipeline_images(folder: str, size: tuple[int, int]):
    """The vendored BCCD photos (tests/data/bccd, 640x480) with their boxes, as JPEGs of `size` (w, h) written into
    `folder` where it differs from theirs: rows of the training schema."""
    import warnings

    import datasets
    from PIL import Image

    from deformable_detr.data.schema import records_to_dataset
    from deformable_detr.data.voc import load_voc

    with warnings.catch_warnings():  # BCCD has a few boxes without area, left out with a warning
        warnings.simplefilter("ignore")
        splits, class_names = load_voc(os.path.join(os.path.dirname(__file__), "..", "tests", "data", "bccd"))
    records = []
    for row in (row for split in splits.values() for row in split.cast_column("image", datasets.Image(decode=False))):
        path, (width, height) = row["image"]["path"], size
        scale_x, scale_y = width / row["width"], height / row["height"]
        if (row["width"], row["height"]) != size:
            image = Image.open(path).convert("RGB").resize(size, Image.BICUBIC)
            path = os.path.join(folder, f"{len(records)}.jpg")
            image.save(path, quality=90)
        objects = dict(row["objects"])
        objects["bbox"] = [[x * scale_x, y * scale_y, w * scale_x, h * scale_y] for x, y, w, h in objects["bbox"]]
        objects["area"] = [a * scale_x * scale_y for a in objects["area"]]
        records.append({**row, "image": path, "image_id": len(records), "width": width, "height": height})
        records[-1]["objects"] = objects
    return records_to_dataset(records, class_names, crowds=True)


def bench_input_pipeline(
    sizes=((640, 480), (1920, 1440)), image_size: int = 800, images: int = 48, batch_size: int = 2, repeats: int = 5
) -> dict:
    """(h): images/s per core of the training input pipeline (make_loaders' samples and collator, DETR's
    augmentation at `image_size`), one process with one torch thread, for JPEGs of each of `sizes` (w, h): after a
    warm-up pass, the median of `repeats` passes over `images` samples in batches of `batch_size`, each timed by
    the process's CPU time (a busy machine slows the wall clock, not that) and by the wall clock.
    Returns {size: (images per CPU second, images per wall-clock second)}."""
    from deformable_detr.data.samples import DetectionCollator, DetectionSamples
    from deformable_detr.data.transforms import DetrAugmentation
    from deformable_detr.model.image_processing_deformable_detr import DeformableDetrImageProcessor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"\n(h) input pipeline: samples + collator, DETR augmentation at {image_size} px, 1 process, 1 thread")
    rates = {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            for size in sizes:
                rows = pipeline_images(folder, size)
                samples = DetectionSamples(rows, DetrAugmentation(image_size, round(image_size * 1333 / 800)))
                # as make_loaders has it: augmented images come resized, the processor normalises and pads them
                collate = DetectionCollator(DeformableDetrImageProcessor(do_resize=False))
                cpu, wall = [], []
                for repeat in range(repeats + 1):
                    start_cpu, start_wall = time.process_time(), time.perf_counter()
                    for start in range(0, images, batch_size):
                        collate([samples[i % len(samples)] for i in range(start, start + batch_size)])
                    if repeat:  # the first pass warms up
                        cpu.append(time.process_time() - start_cpu)
                        wall.append(time.perf_counter() - start_wall)
                rates[size] = (images / statistics.median(cpu), images / statistics.median(wall))
                print(
                    f"{size[0]}x{size[1]} JPEGs: {rates[size][0]:6.1f} images per CPU second "
                    f"({rates[size][1]:6.1f} per wall-clock second)",
                    flush=True,
                )
    finally:
        torch.set_num_threads(threads)
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each side for (a) and (b) (default 5)")
    parser.add_argument("--train_repeats", type=int, default=2, help="timed runs of each side for (c) (default 2)")
    parser.add_argument(
        "--only",
        choices=["op", "model", "export", "memory", "evaluation", "data"],
        help="run only part (a), only (b) and (c), only (d), only (e), only (f) or only (h)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    print(
        f"machine: {platform.node()} ({device_name(device)}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}"
    )
    start = time.perf_counter()
    if args.only in (None, "op"):
        bench_op(device, args.repeats)
    if args.only in (None, "model"):
        bench_model(device, args.repeats, args.train_repeats)
    if args.only == "export" or (args.only is None and device.type == "cpu"):
        bench_export(args.repeats)
    if args.only in (None, "memory"):
        bench_memory(device, args.train_repeats)
    if args.only in (None, "evaluation"):
        bench_evaluation()
    if args.only in (None, "data"):
        bench_input_pipeline()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
