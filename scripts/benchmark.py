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
  (g) data loading (`--only data`): `load_detection_dataset` of synthetic COCO folders the size of COCO (118k
      images, 860k boxes) and of Objects365 (1.7M images, 10M boxes), their images hard links of a few small JPEGs:
      seconds and memory per process, the first time (the cache is built) and from the cache, for 1 process and for
      4 started at once (one builds, the others wait, then all memory-map it). `--data_scale` shrinks them.
  (h) the input pipeline (`--only data`): images/s per core of the training samples and collator (decoding, DETR's
      augmentation at 800 px, normalising and padding), one process and one torch thread, on the vendored BCCD
      photos at their 640x480 and enlarged to 1920x1440 (where decoding at reduced size pays).

Peak memory is the growth of the process's peak resident memory during one call (Linux: VmHWM after
resetting it); on a GPU, torch.cuda.max_memory_allocated.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
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


DATA_SETS = {  # name: (images, boxes, classes), as COCO's train2017 and Objects365's train set
    "coco": (118_287, 860_001, 80),
    "objects365": (1_700_000, 10_000_000, 365),
}
JPEG_SIZES = [(64, 48), (48, 64), (80, 60), (96, 72)]  # the few small JPEGs that every image links to
DATA_WORKER = """
import json, sys, time
import torch
from deformable_detr.data.sources import load_detection_dataset
from deformable_detr.utils.benchmarking import PeakMemory

def private_mib():  # the process's own memory, not the file pages it maps (which processes share)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

before = private_mib()
with PeakMemory(torch.device("cpu")) as peak:
    start = time.perf_counter()
    splits, names = load_detection_dataset(sys.argv[1])
    seconds = time.perf_counter() - start
images = sum(len(split) for split in splits.values())
print(json.dumps({"seconds": seconds, "peak_mib": peak.mib, "private_mib": private_mib() - before, "images": images}))
"""


def synthetic_coco_folder(folder: str, images: int, boxes: int, classes: int, seed: int = 0) -> str:
    """A COCO folder (`annotations/instances_{train,val}.json`, 5% of the images in val) of `images` images with
    about `boxes` boxes of `classes` classes, written under `folder` unless it is there already; the images are
    hard links of a few small JPEGs (JPEG_SIZES, other ones in each split), 10,000 a folder. Returns its path."""
    from PIL import Image

    root = os.path.join(folder, f"coco_{images}_{boxes}_{classes}_{seed}")
    if os.path.exists(os.path.join(root, "complete")):
        return root
    rng = np.random.default_rng(seed)
    originals = {"train": [], "val": []}  # of other byte sizes: no file of val is a copy of one of train
    for split, quality in (("train", 95), ("val", 50)):
        for k, (width, height) in enumerate(JPEG_SIZES):
            originals[split].append(os.path.join(folder, f"original_{split}_{k}.jpg"))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(originals[split][-1], quality=quality)
    counts = rng.poisson(boxes / images, images)
    owner = np.repeat(np.arange(images), counts)  # the image of each box
    wh = np.asarray(JPEG_SIZES)[owner % len(JPEG_SIZES)]
    corner = rng.random((len(owner), 2)) * wh / 2
    side = 1 + rng.random((len(owner), 2)) * (wh / 2 - 1)
    category = rng.integers(1, classes + 1, len(owner))
    val_from = images - images // 20
    for split, lo, hi in (("train", 0, val_from), ("val", val_from, images)):
        _write_coco_split(root, split, lo, hi, owner, corner, side, category, classes, originals[split])
    open(os.path.join(root, "complete"), "w").close()
    return root


def _write_coco_split(root, split, lo, hi, owner, corner, side, category, classes, originals):
    """One split's images (hard links) and annotation file, of the images lo..hi-1 and their boxes."""
    lines = []
    for i in range(lo, hi):
        name = f"{i // 10_000:04d}/{i:08d}.jpg"
        if i % 10_000 == 0 or i == lo:
            os.makedirs(os.path.join(root, split, f"{i // 10_000:04d}"), exist_ok=True)
        target = os.path.join(root, split, name)
        if not os.path.exists(target):
            os.link(originals[i % len(originals)], target)
        width, height = JPEG_SIZES[i % len(JPEG_SIZES)]
        lines.append(f'{{"id": {i}, "file_name": "{name}", "width": {width}, "height": {height}}}')
    first, last = np.searchsorted(owner, [lo, hi])
    columns = zip(range(first, last), *(a[first:last].tolist() for a in (owner, category, *corner.T, *side.T)))
    annotations = [
        f'{{"id": {j}, "image_id": {i}, "category_id": {c}, "bbox": [{x:.2f}, {y:.2f}, {w:.2f}, {h:.2f}], '
        f'"area": {w * h:.2f}, "iscrowd": 0}}'
        for j, i, c, x, y, w, h in columns
    ]
    categories = [f'{{"id": {c}, "name": "class {c}", "supercategory": "thing"}}' for c in range(1, classes + 1)]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        f.write('{"images": [' + ", ".join(lines) + '], "annotations": [')
        f.write(", ".join(annotations) + '], "categories": [' + ", ".join(categories) + "]}")


def _load_in_processes(folder: str, cache: str, processes: int) -> list[dict]:
    """`processes` fresh Pythons started at once, each loading `folder` with the cache in `cache`: their
    {"seconds", "peak_mib", "private_mib", "images"}."""
    env = dict(os.environ, DEFORMABLE_DETR_DATA_CACHE=cache, OMP_NUM_THREADS="1")
    started = [
        subprocess.Popen([sys.executable, "-c", DATA_WORKER, folder], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    results = []
    for process in started:
        out, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"loading {folder} failed in a process (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def bench_data_loading(data_sets: list[str], scale: float, processes: list[int], data_dir: str | None):
    """(g): for each of `data_sets` (DATA_SETS) at `scale`, the load time and memory per process of 1 and 4
    processes, the first time (an empty cache) and from the cache. `data_dir`: where the synthetic folders are
    kept between runs (default: a temporary folder, removed at the end)."""
    print(f"\n(g) data loading: load_detection_dataset of synthetic COCO folders (scale {scale:g})")
    print(
        f"{'data set':40s} {'processes':>9s} {'first s':>8s} {'cached s':>8s} {'peak MiB first':>14s} "
        f"{'peak MiB cached':>15s} {'private MiB cached':>18s}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        for name in data_sets:
            full_images, full_boxes, classes = DATA_SETS[name]
            images, boxes = max(1, round(full_images * scale)), max(1, round(full_boxes * scale))
            folder = synthetic_coco_folder(data_dir or scratch, images, boxes, classes)
            for count in processes:
                cache = tempfile.mkdtemp(dir=scratch)
                first, cached = (_load_in_processes(folder, cache, count) for _ in range(2))
                label = f"{name} ({images:,} images, {boxes:,} boxes)"
                print(
                    f"{label:40s} {count:9d} {max(r['seconds'] for r in first):8.1f} "
                    f"{max(r['seconds'] for r in cached):8.1f} {max(r['peak_mib'] for r in first):14.0f} "
                    f"{max(r['peak_mib'] for r in cached):15.0f} {max(r['private_mib'] for r in cached):18.0f}",
                    flush=True,
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
        help="run only part (a), only (b) and (c), only (d), only (e), only (f) or only (g) and (h)",
    )
    parser.add_argument(
        "--data_sets", nargs="+", choices=sorted(DATA_SETS), default=list(DATA_SETS), help="the data sets of (g)"
    )
    parser.add_argument(
        "--data_scale", type=float, default=1.0, help="(g)'s data sets at this fraction of their size (default 1)"
    )
    parser.add_argument(
        "--data_processes", type=int, nargs="+", default=[1, 4], help="(g)'s process counts (default 1 4)"
    )
    parser.add_argument(
        "--data_dir", help="where (g) keeps its synthetic folders between runs (default: a temporary folder)"
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
        bench_data_loading(args.data_sets, args.data_scale, args.data_processes, args.data_dir)
        bench_input_pipeline()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
