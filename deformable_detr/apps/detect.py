"""Detect objects in images with a saved Deformable DETR: one JSON of detections and one picture with the
boxes drawn per image (`detect_files`; the `deformable-detr-detect` command in cli.py). Unreadable images are
reported by name and skipped.

Outputs keep each image's full name and its path relative to the inputs' common folder, under --output_dir:
a/x.jpg and b/x.png give a/x.jpg.detections.json, a/x.jpg.detections.jpg, b/x.png.detections.json and
b/x.png.detections.jpg. Inputs are never overwritten, and these outputs are left out of folders and globs. Each
output is written to a temporary file beside it and renamed when complete, so an interrupted run leaves no partial
file."""

import glob
import json
import os
import warnings

from PIL import Image
from tqdm.auto import tqdm

from ..data.image_files import SHOWN, UNREADABLE, too_thin
from ..metrics.predictions import detect, of_classes, warn_of_non_finite_outputs
from ..utils.devices import checked_device
from ..utils.drawing import draw_detections
from ..utils.file_writing import replaced_when_done
from ..utils.messages import listed
from .video import VIDEO_SUFFIXES, VideoError, detect_video, is_video, video_library

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
COMBINED = "detections.json"  # every image's detections in one file, in COCO's results format (`combined_results`)
OUTPUT_SUFFIX = ".detections"  # x.jpg -> x.jpg.detections.json and x.jpg.detections.<image_format>
PROCESSOR_FILE = "preprocessor_config.json"
PIL_FORMATS = {"jpg": "JPEG", "png": "PNG"}


class DetectionInterrupted(KeyboardInterrupt):
    """Ctrl-C during `detect_files`: `written` lists the images whose outputs were written (each one whole)."""

    def __init__(self, written: list[str]):
        super().__init__(f"interrupted after {len(written)} image(s) written")
        self.written = written


def is_output(path: str) -> bool:
    """A file this command wrote (x.jpg.detections.png, x.jpg.detections.json)."""
    return os.path.splitext(path)[0].lower().endswith(tuple(s + OUTPUT_SUFFIX for s in IMAGE_SUFFIXES + VIDEO_SUFFIXES))


def images_in(folder: str) -> list[str]:
    """The images of a folder (not of its subfolders), sorted, without the files this command wrote."""
    names = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES) and not is_output(f)]
    return sorted(os.path.join(folder, f) for f in names)


def find_images(inputs: list[str]) -> list[str]:
    """Files, folders (their images, sorted) and glob patterns (a matched folder is searched as a folder is) ->
    image paths, in order, without repeats; FileNotFoundError naming an input that gives none. Folders and globs
    leave out the files this command wrote."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = images_in(item)
            if not found:
                raise FileNotFoundError(
                    f"no images in the folder {item!r} (its subfolders are not searched: give a glob such as "
                    f"'{os.path.join(item, '**', '*.jpg')}')"
                )
        elif os.path.exists(item):
            found = [item]
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no image, folder or glob match for {item!r}")
            found = [p for match in matches for p in (images_in(match) if os.path.isdir(match) else [match])]
            found = [path for path in found if not is_output(path)]
            if not found:
                raise FileNotFoundError(
                    f"no images match {item!r} (it matches only folders without images or this command's outputs)"
                )
        paths += found
    unique = {}
    for path in paths:
        unique.setdefault(os.path.abspath(path), path)
    return list(unique.values())


def output_paths(paths: list[str], output_dir: str, image_format: str) -> dict[str, tuple[str, str]]:
    """Each image's JSON and picture: its path relative to the images' common folder, under output_dir, with
    ".detections.json" and ".detections.<image_format>" added (".detections.mp4" for a video). ValueError, naming
    it, if one would be an input."""
    if not paths:
        return {}
    common = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])
    inputs = {os.path.realpath(path): path for path in paths}
    outputs = {}
    for path in paths:
        base = os.path.join(output_dir, os.path.relpath(os.path.abspath(path), common)) + OUTPUT_SUFFIX
        outputs[path] = (base + ".json", f"{base}.{'mp4' if is_video(path) else image_format}")
        for output in outputs[path]:
            if os.path.realpath(output) in inputs:
                raise ValueError(f"{output} would overwrite the input {inputs[os.path.realpath(output)]}")
    return outputs


def load_detector(model_path: str, device: str):
    """Our detector (converted when the folder or Hub id holds transformers' model) and its processor; for an
    .onnx file, an `OnnxDetector` (onnxruntime, on the CPU) and the processor stored in it."""
    from transformers.utils import cached_file

    from ..model.image_processing_deformable_detr import DeformableDetrImageProcessor
    from ..weights.loading import load_model

    if is_onnx(model_path):
        from .onnx_detector import OnnxDetector

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"model {model_path}: no such file")
        detector = OnnxDetector(model_path)
        return detector, detector.image_processor()
    model = load_model(model_path)
    config = cached_file(
        model_path,
        PROCESSOR_FILE,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    if config is None:
        warnings.warn(
            f"{model_path} has no {PROCESSOR_FILE}: using the default image processor (shortest edge 800, longest "
            "1333, ImageNet mean and std)",
            stacklevel=2,
        )
        processor = DeformableDetrImageProcessor()
    else:
        try:
            processor = DeformableDetrImageProcessor.from_pretrained(model_path)
        except (OSError, ValueError, TypeError) as error:  # OSError: not valid JSON
            raise ValueError(f"{os.path.join(model_path, PROCESSOR_FILE)}: {error}") from None
    return model.to(device).eval(), processor


def is_onnx(model_path: str) -> bool:
    """Whether --model names an .onnx file (any case: X.ONNX too)."""
    return model_path.lower().endswith(".onnx")


def read_image(path: str) -> Image.Image:
    """An image file as RGB (`to_rgb_image`); one of UNREADABLE if PIL cannot read it, and PIL's warnings (a
    decompression bomb of 89 to 179 Mpx) again with the file's name."""
    from ..model.image_processing_deformable_detr import to_rgb_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as image:
            rgb = to_rgb_image(image)
    for warning in caught:
        warnings.warn(f"{path}: {warning.message}", warning.category, stacklevel=3)
    return rgb


def detect_files(
    inputs: list[str],
    model_path: str,
    output_dir: str = "detections",
    threshold: float = 0.5,
    top_k: int = 100,
    batch_size: int = 4,
    device: str | None = None,
    image_format: str = "jpg",
    classes: list[str] | None = None,
) -> dict:
    """Detections of a saved model (folder or Hub id) in image files, folders or glob patterns: one JSON and one
    picture per image in output_dir, named as `output_paths` says (a/x.jpg -> a/x.jpg.detections.json and
    a/x.jpg.detections.jpg, a/ relative to the images' common folder), so no two images share an output and no
    input is overwritten (ValueError before anything is written if one would be). Unreadable images are named
    in a warning and skipped; ValueError if none could be read. A video (VIDEO_SUFFIXES, needs PyAV: the [video]
    extra) is read frame by frame: one JSON of every frame's detections and a new video with the boxes drawn.
    classes: the class names to keep (ValueError listing the model's for one it lacks). Every image's and frame's
    detections also go to output_dir/detections.json (`combined_results`), written last. Ctrl-C raises
    DetectionInterrupted, with the images written so far. -> {"written": [...], "skipped": {path: reason}}."""
    _check_settings(threshold, top_k, batch_size, image_format, output_dir)
    device = checked_device(device)
    paths = find_images(inputs)
    outputs = output_paths(paths, output_dir, image_format)
    videos = [path for path in paths if is_video(path)]
    if videos:
        video_library(videos[0])
    model, processor = load_detector(model_path, device)
    keep = class_ids(model.config.id2label, classes)
    os.makedirs(output_dir, exist_ok=True)
    written, skipped, broken, entries = [], {}, [], []
    images_only = [path for path in paths if not is_video(path)]
    batches = [images_only[i : i + batch_size] for i in range(0, len(images_only), batch_size)]
    try:
        for path in videos:
            try:
                entries += detect_video(path, model, processor, (threshold, top_k, batch_size, keep), *outputs[path])
                written.append(path)
            except VideoError as error:
                skipped[path] = str(error)
                warnings.warn(f"skipped {path}: {error}", stacklevel=2)
        for batch in tqdm(batches, desc="detecting", unit="batch", disable=len(images_only) <= 1):
            names, images = read_batch(batch, resize_sides(processor), skipped)
            if not images:
                continue
            detections, not_finite_rows = detect(model, processor, images, threshold, top_k)
            broken += [names[i] for i in not_finite_rows]
            for path, image, found in zip(names, images, detections):
                found = of_classes(found, keep)
                write_outputs(path, image, found, *outputs[path], PIL_FORMATS[image_format])
                written.append(path)
                entries.append({"file_name": path, "width": image.width, "height": image.height, "found": found})
    except KeyboardInterrupt:
        raise DetectionInterrupted(written) from None
    warn_of_non_finite_outputs(broken)
    if not written:
        raise ValueError(f"none of the {len(paths)} image(s) could be read: {listed(list(skipped), SHOWN)}")
    with replaced_when_done(os.path.join(output_dir, COMBINED)) as temporary, open(temporary, "w") as f:
        json.dump(combined_results(entries, model.config.id2label), f)
    return {"written": written, "skipped": skipped}


def _check_settings(threshold: float, top_k: int, batch_size: int, image_format: str, output_dir: str):
    """ValueError naming the first of `detect_files`' settings out of its range."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    if image_format not in PIL_FORMATS:
        raise ValueError(f"image_format must be jpg or png, got {image_format!r}")
    if not output_dir:
        raise ValueError("output_dir (--output_dir) is empty; give a folder")


def read_batch(paths: list[str], sides: tuple[int, int] | None, skipped: dict) -> tuple[list[str], list[Image.Image]]:
    """(the paths, the images) of those of `paths` that can be read and resized to `sides` (`resize_sides`); the
    others go into `skipped` (path -> why) with a warning naming them."""
    names, images = [], []
    for path in paths:
        try:
            image = read_image(path)
        except UNREADABLE as error:
            skipped[path] = f"{type(error).__name__}: {error}"
            warnings.warn(f"skipped {path}: cannot read it as an image ({error})", stacklevel=3)
            continue
        if thin := too_thin(image.width, image.height, sides):
            skipped[path] = thin
            warnings.warn(f"skipped {path}: too thin to resize ({thin})", stacklevel=3)
            continue
        images.append(image)
        names.append(path)
    return names, images


def resize_sides(processor) -> tuple[int, int] | None:
    """(shortest, longest) edge the processor resizes images to, as the image checks take them; None for a
    processor that resizes otherwise (to a fixed or a maximal height and width)."""
    size = processor.size or {}
    return (size["shortest_edge"], size["longest_edge"]) if {"shortest_edge", "longest_edge"} <= set(size) else None


def class_ids(id2label: dict[int, str], classes: list[str] | None) -> set[int] | None:
    """The ids of the class names to keep (None: all); ValueError naming those the model lacks, with its own."""
    if classes is None:
        return None
    ids = {name: i for i, name in id2label.items()}
    unknown = [name for name in classes if name not in ids]
    if unknown or not classes:
        raise ValueError(
            f"classes {unknown or classes}: the model's classes are {[id2label[i] for i in sorted(id2label)]}"
        )
    return {ids[name] for name in classes}


def combined_results(entries: list[dict], id2label: dict[int, str]) -> dict:
    """The detections of every image (and video frame) in one COCO-style file: "annotations" is a COCO results list
    ({"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}, what pycocotools' loadRes takes), "images"
    ({"id", "file_name", "width", "height"}, and "frame" for a video's frame, counted from 0) and "categories"
    ({"id", "name"}: the model's label ids) say what the ids are. entries: {"file_name", "width", "height",
    "found": detections as `detect` gives them, and "frame" for a video}."""
    images, annotations = [], []
    for image_id, entry in enumerate(entries, 1):
        images.append({"id": image_id} | {k: v for k, v in entry.items() if k != "found"})
        for det in entry["found"]:
            x0, y0, x1, y1 = det["box"]
            bbox = [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]
            annotations.append(
                {"image_id": image_id, "category_id": det["label_id"], "bbox": bbox, "score": det["score"]}
            )
    categories = [{"id": i, "name": id2label[i]} for i in sorted(id2label)]
    return {"images": images, "categories": categories, "annotations": annotations}


def write_outputs(path: str, image: Image.Image, found: list[dict], json_path: str, picture_path: str, pil_format):
    """The JSON of `found` (an image's detections) and the picture with them drawn, written whole or not at all
    (`replaced_when_done`): both go to temporary files first, and the JSON is put in place last."""
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with replaced_when_done(json_path) as json_temporary, replaced_when_done(picture_path) as picture_temporary:
        with open(json_temporary, "w") as f:
            json.dump({"image": path, "width": image.width, "height": image.height, "detections": found}, f, indent=1)
        draw_detections(image, found).save(picture_temporary, format=pil_format)
