"""A look at a detection dataset before training, as `deformable-detr-data check|show` (cli.py) runs it: the data
as the training command loads it (`load_detection_dataset`, whose warnings and log lines are the problems
reported, never checked a second time here), counted per split and class with a histogram of box sizes, and its
boxes drawn on a few images per split."""

import logging
import os
import warnings

from ..data.image_files import image_name
from ..data.objects import objects_of
from ..data.sources import dataset_format, load_detection_dataset
from ..model.image_processing_deformable_detr import to_rgb_image
from ..utils.drawing import draw_detections
from ..utils.file_writing import replaced_when_done

# box sizes, sqrt(area) in pixels: the edges of COCO's small (< 32) / medium / large (>= 96) among them
SIZE_EDGES = [0, 8, 16, 32, 64, 96, 128, 256, 512]


class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def loaded_with_problems(source: str, **options) -> tuple[dict, list[str], list[str], list[str]]:
    """`load_detection_dataset(source, skip_bad_images=True, **options)` (every bad image listed, none refused)
    -> (splits: train, validation, test first; class names; problems: its warnings and warning log lines; notes:
    its info log lines)."""
    recorder, package = _Recorder(), logging.getLogger("deformable_detr")
    level = package.level
    package.addHandler(recorder)
    package.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            splits, class_names = load_detection_dataset(source, skip_bad_images=True, **options)
    finally:
        package.removeHandler(recorder)
        package.setLevel(level)
    known = ["train", "validation", "test"]  # first, in this order; any other split after them
    splits = {name: splits[name] for name in sorted(splits, key=lambda n: (known.index(n) if n in known else 3, n))}
    problems = [f"{w.category.__name__}: {w.message}" for w in caught]
    problems += [r.getMessage() for r in recorder.records if r.levelno >= logging.WARNING]
    notes = [r.getMessage() for r in recorder.records if r.levelno < logging.WARNING]
    return splits, class_names, problems, notes


def split_counts(split, class_names: list[str]) -> dict:
    """{"images", "images_without_objects", "objects", "crowd" (crowd regions, VOC's difficult objects: not trained
    on), "per_class": {name: objects}, "box_sizes": [sqrt(area) per object]} of one split."""
    per_class = dict.fromkeys(class_names, 0)
    counts = {"images": len(split), "images_without_objects": 0, "objects": 0, "crowd": 0}
    sizes = []
    for row in split.select_columns("objects"):
        objects = objects_of(row)
        counts["images_without_objects"] += not objects["bbox"]
        for category, area, crowd in zip(objects["category"], objects["area"], objects["iscrowd"]):
            if crowd:
                counts["crowd"] += 1
                continue
            counts["objects"] += 1
            per_class[class_names[category]] += 1
            sizes.append(float(area) ** 0.5)
    return counts | {"per_class": per_class, "box_sizes": sizes}


def check_dataset(source: str, **options) -> dict:
    """The report `deformable-detr-data check` prints: {"source", "format", "classes", "splits": {name:
    `split_counts` without box_sizes}, "box_sizes": {"edges": SIZE_EDGES, "counts": objects per bin [edge_i,
    edge_i+1), the last open}, "problems", "notes"}. `options` go to `load_detection_dataset` (validation_fraction,
    seed, image_size, max_image_size); an error it raises (a refused dataset) is raised."""
    splits, class_names, problems, notes = loaded_with_problems(source, **options)
    counted = {name: split_counts(split, class_names) for name, split in splits.items()}
    histogram = [0] * len(SIZE_EDGES)
    for counts in counted.values():
        for size in counts.pop("box_sizes"):
            histogram[sum(size >= edge for edge in SIZE_EDGES[1:])] += 1
    return {
        "source": source,
        "format": dataset_format(source),
        "classes": class_names,
        "splits": counted,
        "box_sizes": {"edges": SIZE_EDGES, "counts": histogram},
        "problems": problems,
        "notes": notes,
    }


def format_report(report: dict, bar_width: int = 40) -> str:
    """`check_dataset`'s report as text: a table of objects per class and split, the box-size histogram as bars,
    then the problems (or that there are none)."""
    splits = report["splits"]
    width = max([len("images without objects")] + [len(name) for name in report["classes"]]) + 2
    lines = [f"{report['source']} ({report['format']}): {len(report['classes'])} classes, splits {list(splits)}", ""]
    lines.append(f"{'':<{width}}" + "".join(f"{name:>12}" for name in splits))
    rows = [(name, lambda c, name=name: c["per_class"][name]) for name in report["classes"]]
    rows += [(key.replace("_", " "), lambda c, key=key: c[key]) for key in ("objects", "crowd", "images")]
    rows.append(("images without objects", lambda c: c["images_without_objects"]))
    for label, value in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{value(counts):>12}" for counts in splits.values()))
    edges, counts = report["box_sizes"]["edges"], report["box_sizes"]["counts"]
    lines += ["", "box sizes, sqrt(area) in pixels (COCO: small < 32 <= medium < 96 <= large), all splits:"]
    most = max(counts) or 1
    for low, high, count in zip(edges, edges[1:] + [None], counts):
        label = f"{low}-{high}" if high is not None else f">= {low}"
        lines.append(f"{label:>10} {count:>7} {'#' * round(bar_width * count / most)}")
    lines += [""] + [f"note: {note}" for note in report["notes"]]
    problems = report["problems"]
    lines.append(f"{len(problems)} problem(s)" + (":" if problems else ""))
    lines += [f"  {problem}" for problem in problems]
    return "\n".join(lines)


def show_dataset(source: str, output_dir: str, images_per_split: int = 4, **options) -> list[str]:
    """The first `images_per_split` images of each split with their boxes and class names drawn (crowd regions
    as "name (crowd)"), as JPEGs `output_dir/{split}/{row}_{file name}.jpg`; returns their paths. `options` go to
    `load_detection_dataset` (its bad images are left out, as check lists them)."""
    if images_per_split < 1:
        raise ValueError(f"images_per_split must be at least 1, got {images_per_split}")
    from datasets import Image

    splits, class_names, _, _ = loaded_with_problems(source, **options)
    written = []
    for split_name, split in splits.items():
        os.makedirs(os.path.join(output_dir, split_name), exist_ok=True)
        files = split.cast_column("image", Image(decode=False))  # for the names of the images' files
        for row in range(min(images_per_split, len(split))):
            example = split[row]
            objects = objects_of(example)
            boxes = [
                {"box": [x, y, x + w, y + h], "label_id": c, "label": class_names[c] + (" (crowd)" if crowd else "")}
                for (x, y, w, h), c, crowd in zip(objects["bbox"], objects["category"], objects["iscrowd"])
            ]
            stem = os.path.splitext(os.path.basename(image_name(files[row]["image"])))[0].strip("<>")  # <bytes>
            path = os.path.join(output_dir, split_name, f"{row}_{stem}.jpg")
            with replaced_when_done(path) as temporary:
                draw_detections(to_rgb_image(example["image"]), boxes).save(temporary, format="JPEG", quality=90)
            written.append(path)
    return written
